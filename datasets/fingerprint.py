"""64-bit fingerprints of raw string values, vectorised over an Arrow string array.

A fingerprint is a stable function of a value's UTF-8 bytes alone (no vocabulary, no process
salt), so preparation, training and serving compute the same number for the same raw value.
It is used two ways: the raw-value encoder finds a value's id by binary search in its field's
sorted vocabulary fingerprints (one vectorised ``searchsorted`` per field instead of a hash set
rebuilt per request), and a vocabulary can be replaced entirely by hashing the fingerprint.

The function: the bytes are cut into little-endian 64-bit words (zero-padded); each word is
mixed with its position, the mixes are summed, and the sum is mixed with the length. Every
step is a whole-array numpy operation (no loop over rows or over characters). Missing values
(null or empty) get :data:`MISSING`.

Example::

    fingerprint_strings(pa.array(["68fd1e64", None, "a"]))   # int64 [3]
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

MISSING = 0
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)
_LENGTH_KEY = np.uint64(0x2545F4914F6CDD1D)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser of ``x + golden`` (uint64, wrapping)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _C1
    x = (x ^ (x >> np.uint64(27))) * _C2
    return x ^ (x >> np.uint64(31))


def fingerprint_strings(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """int64 fingerprints of a string array (null and "" -> :data:`MISSING`, never otherwise)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    values = values.cast(pa.large_string())
    n = len(values)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.frombuffer(
        values.buffers()[1], dtype=np.int64, count=n + 1, offset=values.offset * 8
    )
    data_buf = values.buffers()[2]
    data = (
        np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    )
    lengths = np.diff(offsets)
    if values.null_count:
        lengths = np.where(values.is_null().to_numpy(zero_copy_only=False), 0, lengths)
    words = np.maximum((lengths + 7) // 8, 1)  # an empty value still owns one (zero) word
    word_start = np.cumsum(words) - words
    total = int(words.sum())
    padded = np.zeros(total * 8, dtype=np.uint8)
    nbytes = int(lengths.sum())
    if nbytes:
        owner = np.repeat(np.arange(n), lengths)
        within = np.arange(nbytes) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        padded[word_start[owner] * 8 + within] = data[offsets[owner] + within]
    position = np.arange(total, dtype=np.uint64) - np.repeat(word_start, words).astype(np.uint64)
    mixed = _mix(padded.view("<u8") ^ _mix(position))
    summed = np.add.reduceat(mixed, word_start)
    out = _mix(summed ^ (lengths.astype(np.uint64) * _LENGTH_KEY)).view(np.int64)
    # Real values never take the missing marker (a 2^-64 event, nudged away deterministically).
    out = np.where(out == MISSING, 1, out)
    return np.where(lengths == 0, MISSING, out)
