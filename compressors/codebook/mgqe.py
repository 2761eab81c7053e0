"""``mgqe`` — Multi-Granular Quantized Embeddings (Kang, Cheng, Yao, Chen, Hong & Chi,
RecSys 2020, arXiv 2002.08530).

DPQ (:mod:`compressors.codebook.dpq`) with fewer choices for infrequent values: the values
with the highest train counts (the head, ``head_share`` of all values) choose among
``head_choices`` centroids per sub-space, the rest (the tail) only among the first
``tail_choices`` of the same centroids, so a tail code costs ``log2 tail_choices`` bits
instead of ``log2 head_choices``. The defaults are the benchmark's setting (Hetu's
``top_percent=0.1``, 256 and 64 choices, vq), and ``P`` is varied for the budget: the most
sub-spaces whose codes and codebook fit.

The head is chosen across fields from the training counts (``FeatureSpec.frequencies``), as
the reference does over its single table: the ``⌈head_share·N⌉`` most frequent values of all
fields. Ids are frequency-ordered by preprocessing, so each field's head is an id prefix and
the artifact holds one integer per field, no per-value flag or remap; the OOV id 0, first
in every field, is in its field's head whenever that field has one. Without frequencies
(feature specs built by hand) each field's head is ``head_share`` of its ids.

Serving bytes: ``⌈H·P·log2 K_head/8⌉ + ⌈T·P·log2 K_tail/8⌉ + G·K_head·D·s`` for ``H`` head
and ``T`` tail rows, two code streams (one per tier) and the codebook values.

Options: those of ``dpq`` (``mode``, ``parts``, ``max_parts``, ``codebooks``, ``storage``,
``reg_weight``, ``batch_norm``, ``init_scale``, ``lr``) plus ``head_share``,
``head_choices``, ``tail_choices``.

Deviations from the paper (beyond DPQ's, which apply): the paper splits values into
frequency groups and tunes each group's codebook size; this is the benchmark's two-group
setting. The paper's MGQE also varies the number of sub-spaces per group in one variant;
here ``P`` is shared by both groups (the variant the benchmark runs). The reference stores a
4-byte head flag per value; here the head is an id prefix per field (frequency order), which
costs nothing.

Example::

    layer = build_compressor("mgqe", features, dim=16, budget="10x")
    layer.hyperparameters()   # {'parts': ..., 'choices': [256, 64], 'head_rows': ...}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from compressors.codebook.dpq import DPQ
from compressors.codebook.pq import MAX_BITS
from compressors.core.base import FeatureSpec
from compressors.core.registry import register
from compressors.hashing.adapt import frequency_heads


@register
class MGQE(DPQ):
    """DPQ with fewer choices for infrequent values (see the module docstring)."""

    name = "mgqe"
    option_help = {
        "head_share": "share of all values (most frequent first) with head_choices centroids",
        "head_choices": "centroids per sub-space for the frequent values",
        "tail_choices": "centroids per sub-space for the others (the first of the same)",
    }

    # The tiers replace DPQ's one choice of centroids; the rest of DPQ's options pass on.
    fixed_options = ("choices", "max_choices")

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        dim: int,
        budget_bytes: int,
        head_share: float = 0.1,
        head_choices: int = 256,
        tail_choices: int = 64,
        **options: Any,
    ) -> None:
        if not 0.0 <= head_share <= 1.0:
            raise ValueError(f"mgqe: head_share must lie in [0, 1], got {head_share}")
        if not 2 <= tail_choices <= head_choices <= 1 << MAX_BITS:
            raise ValueError(
                f"mgqe: need 2 <= tail_choices <= head_choices <= {1 << MAX_BITS}, got "
                f"{tail_choices} and {head_choices}"
            )
        fixed = sorted(set(options) & set(self.fixed_options))
        if fixed:
            raise TypeError(f"mgqe: {fixed} follow from head_choices and tail_choices")
        self.head_share = head_share
        self.head_tail = (head_choices, tail_choices)
        super().__init__(
            features, dim, budget_bytes, choices=None, max_choices=head_choices, **options
        )

    def tier_choices(self, choices: int | None, max_choices: int) -> list[tuple[int, ...]]:
        return [self.head_tail]

    def refusal_hint(self, storage: str, codebooks: str) -> str:
        tips = super().refusal_hint(storage, codebooks)
        extra = "fewer head_choices shrink the codebook"
        return f"{tips}, {extra}" if tips else f"; {extra}"

    def head_rows(self) -> list[int]:
        slots = math.ceil(self.head_share * sum(f.cardinality for f in self.features))
        heads = frequency_heads(self.features, slots, [True] * len(self.features))
        # A field's head is the id prefix [0, stop): the OOV id 0 joins it (see docstring).
        return [stop for _, stop in heads]

    def hyperparameters(self) -> dict[str, Any]:
        return {
            **super().hyperparameters(),
            "head_share": self.head_share,
            "head_rows": sum(self.plan_.heads),
        }
