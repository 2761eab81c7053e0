"""Pruning methods: rows or entries removed (OptEmbed, PEP, DeepLight)."""

from compressors.pruning import deeplight, optembed, pep, serving  # noqa: F401
