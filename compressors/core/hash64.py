"""Vectorised 64-bit integer hashing with per-feature salts (SplitMix64's finaliser).

Torch has no uint64, so the mix runs on int64 with wrapping multiplication and logical
right shifts; results equal the unsigned reference bit for bit. Salts come from a stable
digest of a string (Python's ``hash`` is randomised per process, so it must not be used).

Example::

    salt = stable_salt("C1", chunk=0, seed=0)
    rows = hash_bucket(ids, salt, buckets=1000)      # int64 in [0, 1000)
"""

from __future__ import annotations

import hashlib

import torch

_GOLDEN = 0x9E3779B97F4A7C15
_C1 = 0xBF58476D1CE4E5B9
_C2 = 0x94D049BB133111EB
_INT63 = (1 << 63) - 1


def _signed(x: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return x - (1 << 64) if x >= 1 << 63 else x


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical (zero-filling) right shift of int64 bits."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser of ``x + golden`` on int64 tensors (wrapping arithmetic)."""
    x = x.to(torch.int64) + _signed(_GOLDEN)
    x = (x ^ _shr(x, 30)) * _signed(_C1)
    x = (x ^ _shr(x, 27)) * _signed(_C2)
    return x ^ _shr(x, 31)


def stable_salt(name: str, chunk: int = 0, seed: int = 0) -> int:
    """A 63-bit salt that depends only on (name, chunk, seed)."""
    digest = hashlib.blake2b(f"{seed}/{name}/{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _INT63


def salted_hash(values: torch.Tensor, salt: int | torch.Tensor) -> torch.Tensor:
    """Non-negative 63-bit hash of each value under ``salt`` (a scalar or per-value tensor)."""
    salt_t = torch.as_tensor(salt, dtype=torch.int64)
    return mix64(values.to(torch.int64) ^ mix64(salt_t)) & _INT63


def hash_bucket(
    values: torch.Tensor, salt: int | torch.Tensor, buckets: int | torch.Tensor
) -> torch.Tensor:
    """``salted_hash(values, salt) mod buckets`` (buckets may be per value)."""
    return torch.remainder(salted_hash(values, salt), buckets)
