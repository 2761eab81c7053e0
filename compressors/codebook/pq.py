"""Product-quantized embeddings: codes + codebooks, shared by ``dpq`` and ``mgqe``.

A row of ``D`` dims is ``P`` sub-vectors of ``d = D/P`` dims; sub-space ``p`` has ``K``
centroids ("values"); a row is served as its ``P`` codes, each an index into its sub-space's
values, so a row costs ``P·⌈log2 K⌉`` bits plus its share of the codebooks.

What this module provides:

* :func:`pack_codes` / :func:`unpack_codes` — codes as one little-endian bit stream per tier
  (no per-row byte alignment: 5-bit codes cost 5 bits, which 100x at ``D=16`` needs);
* :class:`CodebookPlan` — the exact bytes of a (tiers, P, K, groups, dtype) choice;
* :class:`ProductQuantizer` — the training side: a query table trained through the fused
  TorchRec/fbgemm kernels (:class:`~compressors.core.storage.TrainTables`, one bag per looked-up
  value, so each value is quantized before bags are pooled), keys and values as parameters,
  ``vq`` (nearest key, straight-through) and ``sx`` (softmax over dot products,
  straight-through) assignment, the reconstruction regulariser;
* :class:`CodebookServing` — the serving side (export kind ``codebook``): for every looked-up
  id of every field at once, its codes are read from the packed stream and its values
  gathered in one ``index_select``; no Python loop over fields.

Tiers (MGQE): the rows of field ``f`` with ids ``< head_f`` are tier 0 (``K_0`` choices), the
rest tier 1 (``K_1 <= K_0`` choices, the first ``K_1`` centroids of the same codebooks, as
the reference's partial argmax). Ids are frequency-ordered by the prepared format, so the
head is an id prefix and needs no remap. Each tier has its own code stream at its own width.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from compressors.core.base import ExportedEmbedding
from compressors.core.hybrid import pool_bags, take_rows
from compressors.core.layout import IdRangeCheck, field_index
from compressors.core.storage import Lookup, TableSpec, TrainTables

KIND = "codebook"
MODES = ("vq", "sx")
GROUPS = ("shared", "field")
DTYPES = {"fp32": (torch.float32, 4), "fp16": (torch.float16, 2)}
MAX_BITS = 8
QUERY_TABLE = "query"
QUERY_KEY = "rows"
ASSIGN_CHUNK = 1 << 15  # rows assigned at once when exporting
SCORE_ENTRIES = 1 << 24  # scores computed at once when assigning codes (64 MiB of fp32)


def code_bits(choices: int) -> int:
    """Bits of one code among ``choices`` centroids: ``⌈log2 K⌉`` (at least 1)."""
    return max(1, math.ceil(math.log2(choices)))


def stream_bytes(rows: int, parts: int, bits: int) -> int:
    """Bytes of ``rows·parts`` codes of ``bits`` bits packed back to back."""
    return -(-rows * parts * bits // 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[n, P]`` (each ``< 2**bits``) -> uint8 ``[⌈n·P·bits/8⌉]``: code ``i`` (row-major)
    occupies bits ``[i·bits, (i+1)·bits)`` of the stream, least significant bit first."""
    flat = codes.reshape(-1)  # any integer dtype: widened a chunk at a time
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes outside [0, 2**{bits})")
    out = torch.empty(stream_bytes(flat.numel(), 1, bits), dtype=torch.uint8)
    # Chunks of a multiple of 8 codes start on a byte boundary; the bit matrix of one is
    # 8·bits bytes a code (8 MiB at 8 bits).
    chunk = 1 << 17
    shifts = torch.arange(bits)
    weights = 1 << torch.arange(8)
    for start in range(0, flat.numel(), chunk):
        part = flat[start : start + chunk].to(torch.int64)
        bitstream = ((part.unsqueeze(1) >> shifts) & 1).reshape(-1)
        pad = -bitstream.numel() % 8
        if pad:
            bitstream = torch.cat([bitstream, bitstream.new_zeros(pad)])
        packed = (bitstream.view(-1, 8) * weights).sum(1).to(torch.uint8)
        first = start * bits // 8
        out[first : first + packed.numel()] = packed
    return out


def unpack_codes(stream: torch.Tensor, index: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes at positions ``index`` (any shape, int64) of a stream from :func:`pack_codes`
    padded with one zero byte (:func:`padded_stream`): a 16-bit window holds any code of at
    most 8 bits."""
    if bits == 8:
        return stream[index].long()
    position = index * bits
    byte = position >> 3
    window = stream[byte].long() | (stream[byte + 1].long() << 8)
    return (window >> (position & 7)) & ((1 << bits) - 1)


def padded_stream(stream: torch.Tensor) -> torch.Tensor:
    return torch.cat([stream, stream.new_zeros(1)])


@dataclass(frozen=True)
class CodebookPlan:
    """What a codebook method's solver decided, and its exact serving bytes.

    ``choices[t]`` centroids for tier ``t`` (tier 0 the largest), ``heads[f]`` the ids of
    field ``f`` in tier 0 (all of them with one tier), ``groups`` codebooks (1 shared, or one
    per field), values stored at ``dtype``.
    """

    dim: int
    parts: int
    choices: tuple[int, ...]
    cardinalities: tuple[int, ...]
    heads: tuple[int, ...]
    groups: int
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        if self.parts < 1 or self.dim % self.parts:
            raise ValueError(f"{self.parts} sub-spaces do not divide dim {self.dim}")
        if not self.choices or list(self.choices) != sorted(self.choices, reverse=True):
            raise ValueError(f"choices per tier must be non-increasing, got {self.choices}")
        if self.choices[-1] < 2 or self.choices[0] > 1 << MAX_BITS:
            raise ValueError(f"choices must lie in [2, {1 << MAX_BITS}], got {self.choices}")
        if len(self.choices) > 2:
            raise ValueError("at most two tiers (head and tail)")
        if self.dtype not in DTYPES:
            raise ValueError(f"codebook dtype must be one of {sorted(DTYPES)}")

    @property
    def sub_dim(self) -> int:
        return self.dim // self.parts

    @property
    def bits(self) -> tuple[int, ...]:
        return tuple(code_bits(k) for k in self.choices)

    def tier_rows(self) -> list[int]:
        head = sum(self.heads)
        return [head] if len(self.choices) == 1 else [head, sum(self.cardinalities) - head]

    def code_bytes(self) -> list[int]:
        return [
            stream_bytes(rows, self.parts, bits)
            for rows, bits in zip(self.tier_rows(), self.bits, strict=True)
        ]

    def codebook_bytes(self) -> int:
        return self.groups * self.choices[0] * self.dim * DTYPES[self.dtype][1]

    def parts_bytes(self) -> dict[str, int]:
        out = {f"codes.{t}": b for t, b in enumerate(self.code_bytes())}
        out["values"] = self.codebook_bytes()
        return out

    @property
    def serve_bytes(self) -> int:
        return sum(self.parts_bytes().values())

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def tier_offsets(plan: CodebookPlan) -> tuple[list[int], list[int]]:
    """Per field, where its head rows start in tier 0's stream and its tail rows in tier 1's
    (in codes' rows, field order)."""
    head, tail, h, t = [], [], 0, 0
    for n, k in zip(plan.cardinalities, plan.heads, strict=True):
        head.append(h)
        tail.append(t)
        h += k
        t += n - k
    return head, tail


class TierIndex(nn.Module):
    """Field ids -> (tier, row within the tier's stream, codebook group), vectorised."""

    def __init__(self, plan: CodebookPlan) -> None:
        super().__init__()
        head, tail = tier_offsets(plan)
        self.tiers = len(plan.choices)
        self.shared = plan.groups == 1
        self.register_buffer("_heads", torch.tensor(plan.heads), persistent=False)
        self.register_buffer("_head_start", torch.tensor(head), persistent=False)
        self.register_buffer("_tail_start", torch.tensor(tail), persistent=False)

    def forward(
        self, ids: torch.Tensor, fields: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """``(is_tail or None, row in its tier, group or None when shared)``."""
        ids = ids.long()
        group = None if self.shared else fields
        if self.tiers == 1:
            return None, self._head_start[fields] + ids, group
        heads = self._heads[fields]
        tail = ids >= heads
        row = torch.where(
            tail, self._tail_start[fields] + ids - heads, self._head_start[fields] + ids
        )
        return tail, row, group


def assignment_scores(
    query: torch.Tensor, keys: torch.Tensor, group: torch.Tensor | None, mode: str
) -> torch.Tensor:
    """``[n, P, K]`` scores of queries ``[n, P, d]`` against keys ``[G, P, K, d]``: negative
    squared euclidean distances (vq) or dot products (sx).

    Accumulated one sub-dimension at a time with elementwise ops, so a row's scores do not
    depend on which other rows share the batch (a matmul's blocking might): training, eval
    and export pick the same codes bit for bit.
    """
    # Without gradients the sum accumulates in place (one score buffer and one term
    # buffer, the same floats in the same order): exporting scores every row.
    inplace = not (torch.is_grad_enabled() and (query.requires_grad or keys.requires_grad))
    scores = term = None
    for j in range(query.shape[2]):
        k = keys[..., j]  # [G, P, K]
        k = k[0] if group is None else k[group]  # [P, K] or [n, P, K]
        q = query[:, :, j].unsqueeze(-1)
        if not inplace:
            term = (q - k).square() if mode == "vq" else q * k
            scores = term if scores is None else scores + term
        elif scores is None:
            scores = (q - k).square_() if mode == "vq" else q * k
        else:
            term = (
                torch.sub(q, k, out=term).square_() if mode == "vq" else torch.mul(q, k, out=term)
            )
            scores.add_(term)
    assert scores is not None
    if mode != "vq":
        return scores
    return scores.neg_() if inplace else -scores


class ProductQuantizer(nn.Module):
    """Training side: query table (fused fbgemm), keys/values, codes by ``mode``.

    ``forward`` takes a KJT of field ids (keys in field order) and returns ``[B, F, D]``;
    in training mode it records the regulariser for :meth:`reg`.
    """

    def __init__(
        self,
        names: Sequence[str],
        plan: CodebookPlan,
        mode: str = "vq",
        init_scale: float = 0.01,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.names = list(names)
        self.plan = plan
        self.mode = mode
        rows = sum(plan.cardinalities)
        self.query = TrainTables(
            [TableSpec(QUERY_TABLE, rows, plan.dim)],
            [Lookup(QUERY_KEY, QUERY_TABLE)],
            init_scale=init_scale,
        )
        offsets = [0]
        for n in plan.cardinalities[:-1]:
            offsets.append(offsets[-1] + n)
        self.register_buffer("_offsets", torch.tensor(offsets), persistent=False)
        shape = (plan.groups, plan.parts, plan.choices[0], plan.sub_dim)
        # Keys start where the queries are (the table's uniform init), so codes spread.
        self.keys = nn.Parameter(torch.empty(shape).uniform_(-init_scale, init_scale))
        # vq ties values to keys (the centroid is both); sx learns values of its own.
        self.values_ = (
            nn.Parameter(torch.empty(shape).uniform_(-init_scale, init_scale))
            if mode == "sx"
            else None
        )
        self.bn = (
            nn.BatchNorm1d(plan.parts * plan.choices[0], affine=False)
            if mode == "sx" and batch_norm
            else None
        )
        self.tiers = TierIndex(plan)
        self.register_buffer("_choice", torch.arange(plan.choices[0]), persistent=False)
        self.serve_fp16 = False
        self.regularizer = torch.zeros(())

    @property
    def values(self) -> torch.Tensor:
        return self.keys if self.values_ is None else self.values_

    def served_values(self) -> torch.Tensor:
        """The values as served: fp16-rounded when served at fp16 (straight-through)."""
        v = self.values
        return v + (v.half().float() - v).detach() if self.serve_fp16 else v

    def lookup_rows(
        self, features: KeyedJaggedTensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(query rows ``[U, D]`` of the batch's distinct rows, their ids, their fields, and
        for every value the index of its row among them)."""
        fields = field_index(features)
        rows = features.values().long() + self._offsets[fields]
        unique, inverse = torch.unique(rows, return_inverse=True)
        unique_fields = torch.searchsorted(self._offsets, unique, right=True) - 1
        ones = torch.ones_like(unique, dtype=torch.int32)
        kjt = KeyedJaggedTensor(keys=[QUERY_KEY], values=unique, lengths=ones)
        ids = unique - self._offsets[unique_fields]
        return self.query(kjt), ids, unique_fields, inverse

    def scores(self, query: torch.Tensor, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        """Assignment scores ``[n, P, K]``, tail rows' extra choices masked out."""
        p = self.plan
        tail, _, group = self.tiers(ids, fields)
        q = query.view(-1, p.parts, p.sub_dim)
        scores = assignment_scores(q, self.keys, group, self.mode)
        if self.bn is not None:
            scores = self.bn(scores.reshape(len(q), -1)).view_as(scores)
        if tail is not None:
            masked = tail.unsqueeze(1) & (self._choice >= p.choices[1]).view(1, -1)
            scores = scores.masked_fill(masked.unsqueeze(1), float("-inf"))
        return scores

    def codes(self, query: torch.Tensor, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        """The codes ``[n, P]``, scored in chunks of at most ``SCORE_ENTRIES`` scores."""
        p = self.plan
        if self.bn is not None and self.training:
            # Batch statistics need the whole batch at once.
            with torch.no_grad():
                return self.scores(query.detach(), ids, fields).argmax(-1)
        if self.bn is None and len(p.choices) > 1:
            return self._tier_codes(query, ids, fields)
        chunk = max(1, SCORE_ENTRIES // (p.parts * p.choices[0]))
        out = []
        with torch.no_grad():
            for start in range(0, len(query), chunk):
                part = slice(start, start + chunk)
                out.append(self.scores(query[part].detach(), ids[part], fields[part]).argmax(-1))
        return torch.cat(out) if out else ids.new_zeros(0, p.parts)

    @torch.no_grad()
    def _tier_codes(
        self, query: torch.Tensor, ids: torch.Tensor, fields: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`codes` tier by tier: a tail row is scored against its tier's
        ``choices[1]`` centroids only, not against all of the head's with the rest masked
        (the same argmax, a fraction of the work)."""
        p = self.plan
        tail, _, group = self.tiers(ids, fields)
        assert tail is not None
        out = ids.new_empty(len(query), p.parts)
        for rows, k in (
            (torch.nonzero(~tail).flatten(), p.choices[0]),
            (torch.nonzero(tail).flatten(), p.choices[1]),
        ):
            keys = self.keys[:, :, :k]
            chunk = max(1, SCORE_ENTRIES // (p.parts * k))
            for start in range(0, len(rows), chunk):
                part = rows[start : start + chunk]
                q = query[part].detach().view(-1, p.parts, p.sub_dim)
                g = None if group is None else group[part]
                out[part] = assignment_scores(q, keys, g, self.mode).argmax(-1)
        return out

    def gather(self, codes: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        """Values of ``codes`` ``[n, P]`` -> ``[n, P, d]``."""
        p = self.plan
        values = self.served_values()
        index = torch.arange(p.parts, device=codes.device) * p.choices[0] + codes
        if p.groups > 1:
            index = index + (fields * p.parts * p.choices[0]).unsqueeze(1)
        return take_rows(values.reshape(-1, p.sub_dim), index)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        # Each distinct row of the batch is quantized once; values then read their row's.
        query, ids, fields, inverse = self.lookup_rows(features)
        p = self.plan
        if not self.training:
            out = self.gather(self.codes(query, ids, fields), fields).reshape(-1, p.dim)
            return pool_bags(take_rows(out, inverse), features)
        q = query.view(-1, p.parts, p.sub_dim)
        if self.mode == "vq":
            chosen = self.gather(self.codes(query, ids, fields), fields)
            # Straight-through: the forward value is the centroid, the task gradient goes
            # to the query; the regulariser pulls the centroids towards their queries
            # (a mean over the batch's values, so a row counts as often as it is read).
            out = q + (chosen - q).detach()
            error = (chosen - q.detach()).square().sum((1, 2))
            self.regularizer = take_rows(error, inverse).mean() / p.dim
        else:
            scores = self.scores(query, ids, fields)
            soft = scores.softmax(-1)
            hard = torch.zeros_like(soft).scatter_(-1, scores.argmax(-1, keepdim=True), 1.0)
            weights = hard + soft - soft.detach()
            values = self.served_values()
            if p.groups == 1:
                out = torch.einsum("npk,pkd->npd", weights, values[0])
            else:
                out = torch.einsum("npk,npkd->npd", weights, take_rows(values, fields))
            self.regularizer = query.new_zeros(())
        return pool_bags(take_rows(out.reshape(-1, p.dim), inverse), features)

    @torch.no_grad()
    def all_codes(self) -> list[torch.Tensor]:
        """Every row's codes (eval-mode assignment, uint8), split by tier: ``[rows_t, P]``
        each."""
        p = self.plan
        was = self.training
        self.eval()
        try:
            weight = self.query.weights()[QUERY_TABLE]
            device = weight.device
            fields = torch.repeat_interleave(
                torch.arange(len(p.cardinalities), device=device),
                torch.tensor(p.cardinalities, device=device),
                output_size=weight.shape[0],
            )
            ids = torch.arange(weight.shape[0], device=device) - self._offsets[fields]
            out = []
            for start in range(0, weight.shape[0], ASSIGN_CHUNK):
                stop = min(weight.shape[0], start + ASSIGN_CHUNK)
                q = weight[start:stop].detach().float()
                # uint8: codes are at most MAX_BITS wide (an eighth of int64's bytes)
                out.append(self.codes(q, ids[start:stop], fields[start:stop]).to(torch.uint8))
            codes = torch.cat(out).cpu()  # assigned on the model's device, packed on the host
        finally:
            self.train(was)
        if len(p.choices) == 1:
            return [codes]
        tail = (ids >= torch.tensor(p.heads, device=device)[fields]).cpu()
        return [codes[~tail], codes[tail]]

    def export(self, method: str) -> ExportedEmbedding:
        p = self.plan
        dtype = DTYPES[p.dtype][0]
        tensors = {
            f"codes.{t}": pack_codes(c, bits)
            for t, (c, bits) in enumerate(zip(self.all_codes(), p.bits, strict=True))
        }
        tensors["values"] = self.values.detach().to(dtype).contiguous().clone()
        return ExportedEmbedding(
            kind=KIND,
            config={"method": method, "fields": self.names, **p.to_json()},
            tensors=tensors,
        )


def checked_plan(exported: ExportedEmbedding) -> tuple[list[str], CodebookPlan]:
    """The fields and plan of a ``codebook`` export, every tensor's dtype and size checked
    against the config before anything is allocated from them (artifacts are untrusted)."""
    cfg = dict(exported.config)
    names = cfg.pop("fields", None)
    cfg.pop("method", None)
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise ValueError("codebook: config 'fields' must be a non-empty list of names")
    try:
        plan = CodebookPlan(
            dim=int(cfg["dim"]),
            parts=int(cfg["parts"]),
            choices=tuple(int(k) for k in cfg["choices"]),
            cardinalities=tuple(int(n) for n in cfg["cardinalities"]),
            heads=tuple(int(h) for h in cfg["heads"]),
            groups=int(cfg["groups"]),
            dtype=str(cfg["dtype"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"codebook: bad config ({e})") from None
    if len(plan.cardinalities) != len(names) or len(plan.heads) != len(names):
        raise ValueError("codebook: config needs one cardinality and head count per field")
    if any(n < 1 or not 0 <= h <= n for n, h in zip(plan.cardinalities, plan.heads, strict=True)):
        raise ValueError("codebook: cardinalities must be positive and heads within them")
    if len(plan.choices) == 1 and list(plan.heads) != list(plan.cardinalities):
        raise ValueError("codebook: with one tier every row is a head row")
    if plan.groups not in (1, len(names)):
        raise ValueError(f"codebook: groups must be 1 or {len(names)}, got {plan.groups}")
    want = {f"codes.{t}": (torch.uint8, b) for t, b in enumerate(plan.code_bytes())}
    want["values"] = (DTYPES[plan.dtype][0], plan.codebook_bytes())
    if set(exported.tensors) != set(want):
        raise ValueError(
            f"codebook: tensors {sorted(set(exported.tensors) ^ set(want))[:4]} differ from "
            "the config's"
        )
    for name, (dtype, nbytes) in want.items():
        t = exported.tensors[name]
        if t.dtype != dtype or t.numel() * t.element_size() != nbytes:
            raise ValueError(
                f"codebook: tensor {name!r} is {t.dtype} of {t.numel() * t.element_size()} "
                f"bytes; the config needs {dtype} of {nbytes}"
            )
    return names, plan


RESIDENT_WIDTHS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
DECODE_ROWS = 1 << 18  # rows decoded at once when loading
# Serving joins g adjacent sub-spaces into one table of their 2^(g·bits) value combinations
# while it has at most this many entries: one gather of g·d floats instead of g of d.
JOINT_ENTRIES = 1 << 12


def joint_parts(parts: int, bits: int) -> int:
    """Sub-spaces served per gather: the largest divisor ``g`` of ``parts`` with
    ``2^(g·bits) <= JOINT_ENTRIES`` (at least 1)."""
    return max(
        g
        for g in range(1, parts + 1)
        if parts % g == 0 and (g == 1 or 1 << (g * bits) <= JOINT_ENTRIES)
    )


def joint_values(values: torch.Tensor, plan: CodebookPlan, g: int) -> torch.Tensor:
    """``[G, P, K, d]`` values -> ``[G·(P/g)·2^(g·b), g·d]``: entry ``e`` of group table ``j``
    concatenates the values of codes ``(e >> b·i) & mask`` of sub-spaces ``j·g + i``."""
    bits = plan.bits[0]
    entries = torch.arange(1 << (g * bits))
    codes = (entries.unsqueeze(1) >> (torch.arange(g) * bits)) & ((1 << bits) - 1)
    codes = codes.clamp(max=plan.choices[0] - 1)  # combinations no row uses
    groups, parts = values.shape[0], plan.parts // g
    by_part = values.view(groups, parts, g, plan.choices[0], plan.sub_dim)
    within = torch.arange(g)
    table = by_part[:, :, within, codes]  # [G, P/g, 2^(g·b), g, d]
    return table.reshape(-1, g * plan.sub_dim)


def words_per_row(parts: int, bits: int) -> int:
    """Integers a row's codes take at serving: the fewest ``w`` dividing ``parts`` whose
    ``parts/w`` codes fit 64 bits."""
    return next(w for w in range(1, parts + 1) if parts % w == 0 and parts // w * bits <= 64)


def row_words(
    plan: CodebookPlan,
    streams: Sequence[torch.Tensor],
    words: int,
    dtype: torch.dtype,
    names: Sequence[str] | None = None,
) -> torch.Tensor:
    """Every row's codes (global row order) from the tiers' packed streams, as ``words``
    integers per row ``[N, words]``: word ``k`` holds codes ``k·c .. (k+1)·c - 1`` (``c =
    P/words``), code ``k·c + i`` at bits ``[i·b, (i+1)·b)`` (``b`` the head tier's width).
    Decoded in chunks, so loading holds no more than a chunk's codes at int64.

    Every code is checked against its tier's centroid count as it is decoded (one ``max``
    per chunk): a packed code of ``b`` bits can name up to ``2^b`` centroids, and one
    beyond ``K`` would read a neighbouring codebook's or a clamped centroid, silently."""
    head_start, tail_start = tier_offsets(plan)
    per_word = plan.parts // words
    out = torch.empty(sum(plan.cardinalities), words, dtype=dtype)
    within = torch.arange(plan.parts)
    shifts = torch.arange(per_word) * plan.bits[0]
    padded = [padded_stream(s) for s in streams]
    row = 0
    for f, (n, h) in enumerate(zip(plan.cardinalities, plan.heads, strict=True)):
        for tier, (first, count) in enumerate(((head_start[f], h), (tail_start[f], n - h))):
            for start in range(0, count, DECODE_ROWS):
                stop = min(count, start + DECODE_ROWS)
                index = torch.arange(first + start, first + stop).unsqueeze(1) * plan.parts
                codes = unpack_codes(padded[tier], index + within, plan.bits[tier])
                _check_codes(codes, plan.choices[tier], tier, f, start, names)
                packed = (codes.view(-1, words, per_word) << shifts).sum(-1)
                out[row + start : row + stop] = packed.to(dtype)
            row += count
    return out


def _check_codes(
    codes: torch.Tensor,
    choices: int,
    tier: int,
    field: int,
    start: int,
    names: Sequence[str] | None,
) -> None:
    """Refuses codes ``[n, P]`` (ids ``start..`` of a field's tier) outside ``[0, choices)``."""
    if codes.numel() == 0:
        return
    high = codes.amax(1)
    if int(high.max()) < choices:
        return
    row = int((high >= choices).nonzero()[0, 0])
    name = names[field] if names is not None else f"#{field}"
    raise ValueError(
        f"codebook: codes.{tier} holds code {int(high[row])} for row {start + row} of field "
        f"{name!r}'s {'head' if tier == 0 else 'tail'}; its tier has {choices} centroids "
        f"(codes in [0, {choices}))"
    )


class CodebookServing(nn.Module):
    """Serving side of ``dpq``/``mgqe`` (export kind ``codebook``).

    At load the packed code streams are re-laid as one integer per row (the row's ``P``
    codes at the head tier's width, in a 1, 2, 4 or 8-byte integer; two or more when they
    take over 64 bits), so a lookup is: ids
    range-checked, one gather of the rows' integers, shifts and masks to the ``P`` codes, one
    ``index_select`` of the sub-vectors from the fp32 values (adjacent sub-spaces joined
    into one table of their value combinations while it stays small: see
    :func:`joint_parts`), and bag pooling — for every
    field at once, no loop over fields or tiers. ``resident_bytes`` is what that holds
    (the artifact's bytes are ``serve_bytes``): at most twice the codes' bytes, plus the
    joined value tables in fp32 (at most ``JOINT_ENTRIES`` rows per group of sub-spaces).
    """

    def __init__(self, exported: ExportedEmbedding) -> None:
        super().__init__()
        names, plan = checked_plan(exported)
        self.names = names
        self.plan = plan
        self.check_ids = IdRangeCheck(dict(zip(names, plan.cardinalities, strict=True)))
        bits = plan.bits[0]
        self.words = words_per_row(plan.parts, bits)
        per_word = plan.parts // self.words
        width = next(w for w in RESIDENT_WIDTHS if 8 * w >= per_word * bits)
        streams = [exported.tensors[f"codes.{t}"] for t in range(len(plan.choices))]
        codes = row_words(plan, streams, self.words, RESIDENT_WIDTHS[width], names)
        self.register_buffer("codes", codes)
        self.joint = joint_parts(per_word, bits)
        if plan.groups > 1 and self.joint > 1:
            # One joint table per field's codebook: only while they stay within the
            # artifact's size (a fixed 4096·D floats per codebook otherwise).
            joint_bytes = plan.groups * 4 * plan.dim << (self.joint * bits)
            if joint_bytes > plan.serve_bytes:
                self.joint = 1
        values = (
            exported.tensors["values"]
            .float()
            .view(plan.groups, plan.parts, plan.choices[0], plan.sub_dim)
        )
        table = joint_values(values, plan, self.joint)
        self.register_buffer("values", table)
        self.entries = 1 << (self.joint * bits)
        offsets = [0]
        for n in plan.cardinalities[:-1]:
            offsets.append(offsets[-1] + n)
        self.register_buffer("_offsets", torch.tensor(offsets), persistent=False)
        self.lookups = plan.parts // self.joint
        shifts = torch.arange(per_word // self.joint) * bits * self.joint
        self.register_buffer("_shifts", shifts, persistent=False)
        self.mask = self.entries - 1
        base = torch.arange(self.lookups) * self.entries
        self.register_buffer("_part_base", base, persistent=False)
        self.resident_bytes = self.codes.numel() * width + table.numel() * 4
        self._order: dict[tuple[str, ...], list[int]] = {}

    def check_fields(self, cardinalities: Mapping[str, int], dim: int) -> None:
        """Refuses a config whose fields, rows or dim are not the model's (the artifact's
        features): swapped cardinalities keep every size and would read other fields' codes."""
        _check_field_rows("codebook", self.names, self.plan.cardinalities, cardinalities)
        if self.plan.dim != dim:
            raise ValueError(f"codebook: config dim {self.plan.dim}, the embedding's is {dim}")

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        keys = features.keys()
        if keys != self.names:
            order = self._order.setdefault(tuple(keys), _order_of(keys, self.names))
            features = features.permute(order)
        self.check_ids(features)
        p = self.plan
        ids = features.values()
        per_key = features.length_per_key()
        if len(set(per_key)) == 1:  # as many ids in every field: no per-value field index
            rows = (ids.view(len(per_key), -1) + self._offsets.unsqueeze(1)).view(-1)
            fields = None
        else:
            fields = field_index(features)
            rows = ids + self._offsets[fields]
        word = self.codes.index_select(0, rows).long()  # [n, words]
        index = ((word.unsqueeze(-1) >> self._shifts) & self.mask).view(len(rows), -1)
        index = index + self._part_base
        if p.groups > 1:
            if fields is None:
                fields = field_index(features)
            index = index + (fields * self.lookups * self.entries).unsqueeze(1)
        out = self.values.index_select(0, index.view(-1)).view(-1, p.dim)
        return pool_bags(out, features)


def _check_field_rows(
    what: str, names: Sequence[str], rows: Sequence[int], cardinalities: Mapping[str, int]
) -> None:
    if list(names) != list(cardinalities):
        raise ValueError(
            f"{what}: config fields {list(names)[:5]}... are not the features "
            f"{list(cardinalities)[:5]}..."
        )
    for name, n in zip(names, rows, strict=True):
        if n != cardinalities[name]:
            raise ValueError(
                f"{what}: config gives field {name!r} {n} rows, its cardinality is "
                f"{cardinalities[name]}"
            )


def _order_of(keys: Sequence[str], names: Sequence[str]) -> list[int]:
    missing = set(names) - set(keys)
    if missing:
        raise KeyError(f"input lacks sparse features {sorted(missing)}")
    return [list(keys).index(n) for n in names]
