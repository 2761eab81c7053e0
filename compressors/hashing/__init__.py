"""Inter-feature methods: values share rows or parameters (hash, unified, qr, adapt, tt, robe,
dhe)."""

from compressors.hashing import adapt, dhe, hash, qr, robe, tt, unified  # noqa: F401
