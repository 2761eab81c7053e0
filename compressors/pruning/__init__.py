"""Pruning methods: rows or entries removed (OptEmbed, PEP, DeepLight)."""
