"""Fingerprint keys: a training-side stage that replaces chosen fields' ids by the 64-bit
fingerprints of their raw values, so a method that hashes values hashes fingerprints.

Serving then needs no vocabulary for those fields: the server fingerprints the raw value
itself (:func:`datasets.fingerprint.fingerprint_strings`, the same function that produced
``FeatureSpec.fingerprints``) and the method's index map runs unchanged — the map is one code
path, fed ids→fingerprints by this stage in training and fingerprints directly in serving.
The id→fingerprint table is training-only (a non-persistent buffer, not exported, not in
``serve_bytes``). Values the vocabulary folded into OOV (rarer than ``min_count``) train as
the missing value's fingerprint but serve as their own: a hashed model sees them as whatever
bucket their fingerprint lands in, as hashing at scale does.

Example::

    keys = FingerprintKeys(features, ["C1", "C2"])   # features carry .fingerprints
    method(keys(kjt_of_ids))
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from compressors.core.base import FeatureSpec
from compressors.core.layout import field_index


class FingerprintKeys(nn.Module):
    """KJT of ids -> the same KJT with ``fields``' values replaced by their fingerprints."""

    def __init__(self, features: Sequence[FeatureSpec], fields: Sequence[str]) -> None:
        super().__init__()
        by_name = {f.name: f for f in features}
        unknown = sorted(set(fields) - set(by_name))
        if unknown:
            raise ValueError(f"fingerprint keys for unknown fields {unknown}")
        lacking = [n for n in fields if by_name[n].fingerprints is None]
        if lacking:
            raise ValueError(
                f"fields {lacking} carry no raw-value fingerprints; build the features with "
                "features_from_dataset(data, fingerprints=True)"
            )
        self.names = [f.name for f in features]
        self.fields = [n for n in self.names if n in set(fields)]
        starts, tables, start = [], [], 0
        for f in features:
            if f.name in self.fields:
                table = np.asarray(f.fingerprints, dtype=np.int64)
                starts.append(start)
                tables.append(table)
                start += len(table)
            else:
                starts.append(-1)
        self.register_buffer(
            "_table",
            torch.from_numpy(np.concatenate(tables) if tables else np.zeros(0, np.int64)),
            persistent=False,
        )
        self.register_buffer("_start", torch.tensor(starts, dtype=torch.int64), persistent=False)
        self.register_buffer(
            "_size",
            torch.tensor([by_name[n].cardinality for n in self.names], dtype=torch.int64),
            persistent=False,
        )

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        if not self.fields:
            return features
        keys = features.keys()
        if keys != self.names:
            features = features.permute([keys.index(k) for k in self.names])
        values = features.values()
        field = field_index(features)
        start = self._start[field]
        keyed = start >= 0
        ids = values.clamp(0).minimum(self._size[field] - 1)
        fingerprints = self._table[torch.where(keyed, start + ids, 0)]
        return KeyedJaggedTensor(
            keys=self.names,
            values=torch.where(keyed, fingerprints, values),
            lengths=features.lengths(),
            stride=features.stride(),
        )
