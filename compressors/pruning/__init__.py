"""Pruning methods: rows or entries removed (OptEmbed, PEP, DeepLight)."""

from compressors.pruning import common, deeplight, entry, optembed, pep  # noqa: F401
