"""Moved to :mod:`compressors.pruning.entry_pruned`; this name stays for one release."""

from compressors.pruning.entry_pruned import EntryPruned, entry_floor_bytes, max_entries  # noqa: F401
