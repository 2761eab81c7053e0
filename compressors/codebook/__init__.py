"""Codebook methods: rows served as codes into learned codebooks (dpq, mgqe) or as
deduplicated blocks (dedup)."""

from compressors.codebook import dedup, dpq, mgqe  # noqa: F401
