"""Precision methods: fewer bits per value (ptq, int8/int16 training, alpt, binary)."""

from compressors.precision import alpt, binary, integer, ptq  # noqa: F401
