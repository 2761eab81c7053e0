"""``dedup`` — post-training block deduplication (the Hetu benchmark's Dedup, adapted from
"Serving Deep Learning Models with Deduplication from Relational Databases", Zhou et al.,
VLDB 2022).

Trains exactly as ``full`` with every field in one multiplexed table; the ``dedup`` stage
then cuts it into blocks of ``block_rows`` rows and merges near-duplicate blocks (L2 LSH
candidates, similar when at least ``sim`` of the entries differ by at most ``fp``) until
only as many distinct blocks remain as the budget pays for; a block remap (one int32 per
block) sends every block to its representative, and ``finetune`` trains the deduplicated
table. ``serve_bytes = U · R · row_bytes + ⌈N/R⌉ · 4``; served in the ``tables`` format
(fbgemm at ``storage``). How it works in detail, and the measured figures:
``docs/methods/dedup.md``.

Options: ``block_rows`` (None: solved from the budget), ``fp``, ``sim``, ``rounds``,
``lsh_bands``, ``lsh_hashes``, ``lsh_width``, ``finetune_epochs``, ``storage``,
``init_scale``, ``seed`` (``option_help`` says each).

Deviations from the reference (Hetu ``scheduler/deduplication.py``):

* ``fp`` doubles until the budget is met, then neighbours merge (the reference asserts).
* Only served blocks absorb others, most similar first.
* The LSH width is relative to the projections' spread (the reference's ``r = 0.09`` is
  absolute); candidates are bounded per bucket.
* The last, partial block is never merged; the block size is solved from the budget.
* Single process: the stage reads the whole table.

Example::

    layer = build_compressor("dedup", features, dim=16, budget="2x")
    layer = build_compressor("dedup", features, dim=16, budget="2x", finetune_epochs=0)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torchrec import KeyedJaggedTensor

from compressors.core.base import Compressor, ExportedEmbedding, FeatureSpec, MemoryReport, Stage
from compressors.core.budget import BudgetError, describe_bytes
from compressors.core.layout import IndexMap, field_index, register_index_map
from compressors.core.registry import register
from compressors.core.storage import (
    Lookup,
    TableSpec,
    TrainTables,
    check_dtype,
    pack_rows,
    row_bytes,
)
from compressors.core.tables import TABLE_KIND

if TYPE_CHECKING:
    from compressors.core.base import StageContext

TABLE = "blocks"
REMAP_BYTES = 4  # int32 per block
WINDOW = 4  # neighbours per block within an LSH bucket
REMAP_SHARE = 0.25  # the solved block size keeps the remap within this share of the budget
MAX_BLOCK_ROWS = 1024
MAX_PAIRS = 1 << 24  # candidate pairs proposed at most (before duplicates are dropped)


@register_index_map
class BlockRemapMap(IndexMap):
    """Field ids -> rows of a block-deduplicated table: ``r = offset_f + id`` is read at
    ``remap[r // R] · R + r % R``."""

    kind = "block_remap"

    def __init__(
        self,
        features: Sequence[str],
        offsets: Sequence[int],
        block_rows: int,
        remap: torch.Tensor,
        blocks: int,
    ) -> None:
        super().__init__(features, features)
        self.offsets = [int(o) for o in offsets]
        self.block_rows = int(block_rows)
        self.blocks = int(blocks)
        self.register_buffer("_offsets", torch.tensor(self.offsets), persistent=False)
        self.register_buffer("remap", remap)

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        features = self.check_keys(features)
        rows = features.values().long() + self._offsets[field_index(features)]
        block = self.remap[rows // self.block_rows].long()
        return KeyedJaggedTensor(
            keys=self.lookup_keys,
            values=block * self.block_rows + rows % self.block_rows,
            lengths=features.lengths(),
            stride=features.stride(),
        )

    def to_config(self) -> dict[str, Any]:
        return {
            **super().to_config(),
            "offsets": self.offsets,
            "block_rows": self.block_rows,
            "blocks": self.blocks,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"remap": self.remap}

    @classmethod
    def from_config(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> IndexMap:
        remap = tensors.get("remap")
        blocks, rows = int(config["blocks"]), int(config["block_rows"])
        if remap is None or remap.dtype != torch.int32 or remap.dim() != 1 or rows < 1:
            raise ValueError("block_remap: needs an int32 vector 'remap' and block_rows >= 1")
        if remap.numel() and (int(remap.min()) < 0 or int(remap.max()) >= blocks):
            raise ValueError(f"block_remap: remap entries outside [0, {blocks})")
        features, offsets = config["features"], config["offsets"]
        if not isinstance(offsets, list) or len(offsets) != len(features):
            raise ValueError("block_remap: needs one offset per feature")
        return cls(features, offsets, rows, remap, blocks)

    def check_tables(self, rows: dict[str, int], lookups: Sequence[Lookup]) -> None:
        # Remap entries are checked against ``blocks``: the table must hold exactly that
        # many blocks, or fbgemm would read past it (zeros, with a log line).
        tables = {lk.table for lk in lookups if lk.key in self.lookup_keys}
        want = self.blocks * self.block_rows
        for t in sorted(tables):
            if rows[t] != want:
                raise ValueError(
                    f"block_remap: table {t!r} has {rows[t]} rows; {self.blocks} blocks of "
                    f"{self.block_rows} rows need {want}"
                )

    def check_fields(self, cardinalities: dict[str, int]) -> None:
        if self.features != list(cardinalities):
            raise ValueError(
                f"block_remap: config fields {self.features[:5]}... are not the features "
                f"{list(cardinalities)[:5]}..."
            )
        start = 0
        for name, offset in zip(self.features, self.offsets, strict=True):
            if offset != start:
                raise ValueError(
                    f"block_remap: field {name!r} starts at row {offset}; the features' "
                    f"cardinalities place it at {start}"
                )
            start += cardinalities[name]
        want = block_count(start, self.block_rows)
        if len(self.remap) != want:
            raise ValueError(
                f"block_remap: remap has {len(self.remap)} entries; {start} rows in blocks of "
                f"{self.block_rows} need {want}"
            )


def block_count(rows: int, block_rows: int) -> int:
    return -(-rows // block_rows)


def solve_block_rows(rows: int, budget_bytes: int) -> int:
    """The smallest power-of-two block (finer blocks merge more precisely) whose remap takes
    at most ``REMAP_SHARE`` of the budget; 1024 rows at most."""
    block = 1
    while block < MAX_BLOCK_ROWS and block_count(rows, block) * REMAP_BYTES > (
        REMAP_SHARE * budget_bytes
    ):
        block *= 2
    return block


def lsh_pairs(
    blocks: np.ndarray, bands: int, hashes: int, width: float, rng: np.random.Generator
) -> np.ndarray:
    """Candidate pairs ``[m, 2]`` (``i < j``) of blocks ``[n, E]`` sharing a bucket in some
    band of an L2 LSH (p-stable projections), each block paired with its ``WINDOW``
    neighbours in the bucket's sorted order."""
    n, entries = blocks.shape
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    a = rng.normal(size=(entries, bands * hashes))
    proj = blocks.astype(np.float64) @ a
    w = width * max(float(proj.std()), 1e-12)
    b = rng.uniform(0, w, size=bands * hashes)
    codes = np.ceil((proj + b) / w).astype(np.int64).reshape(n, bands, hashes)
    # One int64 key per band: the hashes mixed (collisions only add candidates).
    mix = np.array([1_000_003**k for k in range(hashes)], dtype=np.int64)
    keys = (codes * mix).sum(-1)
    # Each block meets at most ``window`` sorted neighbours per band: pairs stay bounded.
    # A pair (i < j) is kept as one int64 key i·n + j (distinct pairs in (i, j) order are
    # the sorted distinct keys): half the bytes of the pairs themselves while collecting.
    window = max(1, min(WINDOW, MAX_PAIRS // max(n * bands, 1)))
    found = []
    for band in range(bands):
        order = np.argsort(keys[:, band], kind="stable")
        sorted_keys = keys[order, band]
        for step in range(1, window + 1):
            same = sorted_keys[step:] == sorted_keys[:-step]
            i, j = order[:-step][same], order[step:][same]
            found.append(np.minimum(i, j) * np.int64(n) + np.maximum(i, j))
    del proj, codes, keys
    pair_keys = np.concatenate(found)
    del found
    pair_keys.sort()
    pair_keys = pair_keys[np.concatenate([[True], pair_keys[1:] != pair_keys[:-1]])]
    # int32 block ids while they fit (a quarter of the int64 pairs' bytes per pass later)
    dtype = np.int32 if n < 2**31 else np.int64
    out = np.empty((len(pair_keys), 2), dtype=dtype)
    out[:, 0] = pair_keys // n
    out[:, 1] = pair_keys % n
    return out


def similarity(blocks: np.ndarray, pairs: np.ndarray, fp: float) -> np.ndarray:
    """Share of entries of each pair's blocks that differ by at most ``fp``."""
    out = np.empty(len(pairs))
    for start in range(0, len(pairs), 1 << 14):
        p = pairs[start : start + (1 << 14)]
        out[start : start + len(p)] = (np.abs(blocks[p[:, 0]] - blocks[p[:, 1]]) <= fp).mean(1)
    return out


def greedy_merges(
    pairs: np.ndarray,
    rep: np.ndarray,
    absorbed: np.ndarray,
    limit: int,
    chain: bool = False,
) -> np.ndarray:
    """Merges along ``pairs`` ``[m, 2]`` in their order, as one pass of the rule in
    :func:`deduplicate` would pair by pair, stopping after ``limit`` merges; updates ``rep``
    and ``absorbed`` and returns the positions of the pairs that merged (ascending).

    The rule: a pair merges when both blocks are still served (``rep[b] == b``) and not both
    have absorbed others (unless ``chain``); the one that has not absorbed (else the first)
    points at the other. A pair's outcome depends only on the earlier pairs that share one
    of its blocks, so the pass is decided in rounds, all vectorised: every pair that is the
    earliest undecided one at both of its blocks is decided at once (no two of them share a
    block), and pairs that can no longer merge (a block merged away, or both absorbing) are
    dropped. Past ``limit`` the rest of the pass would not have run: merges are kept in
    order up to it."""
    m, n = len(pairs), len(rep)
    if m == 0 or limit <= 0:
        return np.zeros(0, dtype=np.int64)
    left, right = pairs[:, 0], pairs[:, 1]
    gone = rep != np.arange(n)  # merged into another block: for good
    hub = absorbed.copy()  # absorbed others: stays served while chain is off

    def alive(k: np.ndarray) -> np.ndarray:
        a, b = left[k], right[k]
        ok = ~(gone[a] | gone[b])
        return ok if chain else ok & ~(hub[a] & hub[b])

    index = np.int32 if m < 2**31 - 1 else np.int64  # positions (and the sentinel m)
    undecided = np.arange(m, dtype=index)
    undecided = undecided[alive(undecided)]
    taken, sources, targets = [], [], []
    first = np.full(n, m, dtype=index)
    while len(undecided):
        a, b = left[undecided], right[undecided]
        first[a] = m
        first[b] = m
        np.minimum.at(first, a, undecided)
        np.minimum.at(first, b, undecided)
        ready = (first[a] == undecided) & (first[b] == undecided)
        k, a, b = undecided[ready], a[ready], b[ready]
        swap = hub[a]  # the block that absorbed others stays served
        src, dst = np.where(swap, b, a), np.where(swap, a, b)
        gone[src] = True
        hub[dst] = True
        taken.append(k)
        sources.append(src)
        targets.append(dst)
        undecided = undecided[~ready]
        undecided = undecided[alive(undecided)]
    if not taken:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(np.concatenate(taken), kind="stable")[:limit]
    src, dst = np.concatenate(sources)[order], np.concatenate(targets)[order]
    rep[src] = dst
    absorbed[dst] = True
    return np.concatenate(taken)[order].astype(np.int64)


def deduplicate(
    blocks: np.ndarray,
    keep: int,
    fp: float,
    sim: float,
    rounds: int,
    bands: int,
    hashes: int,
    width: float,
    seed: int,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Merges blocks ``[n, E]`` until ``keep`` distinct ones remain: ``(representative of
    every block, report)``. The last block is never merged (it may be padded). Every pass
    over pairs is :func:`greedy_merges` (the pair-by-pair rule, decided vectorised)."""
    n = len(blocks)
    rep = np.arange(n)
    absorbed = np.zeros(n, dtype=bool)  # a representative that others merged into
    mergeable = n - 1  # the last block stays
    need = n - keep
    report: dict[str, Any] = {"lsh_merges": 0, "neighbour_merges": 0, "fp": fp, "min_sim": None}
    if need <= 0:
        return rep, report
    rng = np.random.default_rng(seed)
    pairs = lsh_pairs(blocks[:mergeable], bands, hashes, width, rng)
    merged = 0
    # Both blocks of a pair must still be served; a block merges only into the block it was
    # compared with, so one that absorbed others stays (two such merge only in the last
    # resort, chain=True).
    tolerance = fp
    live = pairs
    for _ in range(max(rounds, 0)):
        if len(pairs) == 0:
            break
        # Pairs that can no longer merge (a block merged away, or both absorbing) never
        # will: dropped before scoring (the others keep their order).
        a, b = live[:, 0], live[:, 1]
        live = live[(rep[a] == a) & (rep[b] == b) & ~(absorbed[a] & absorbed[b])]
        # Negated in place: most similar first (stable), and the pass stops at the first
        # pair below sim, a prefix of that order.
        negated = similarity(blocks, live, tolerance)
        np.negative(negated, out=negated)
        order = np.argsort(negated, kind="stable")[: int((negated <= -sim).sum())]
        del negated  # the merged pairs' scores are recomputed below (fewer, and exact)
        candidates = live[order]
        del order
        done = greedy_merges(candidates, rep, absorbed, need - merged)
        if len(done):
            merged += len(done)
            report["lsh_merges"] += len(done)
            low = float(similarity(blocks, candidates[done], tolerance).min())
            report["min_sim"] = low if report["min_sim"] is None else min(report["min_sim"], low)
        report["fp"] = tolerance
        if merged >= need:
            break
        tolerance *= 2
    # The remainder: neighbours in the reference's order (75th percentile), most similar
    # (smallest L2 distance) first, pass after pass.
    while merged < need:
        served = np.flatnonzero(rep[:mergeable] == np.arange(mergeable))
        order = served[np.argsort(np.percentile(blocks[served], 75, axis=1), kind="stable")]
        pairs_n = np.stack([order[:-1], order[1:]], 1)
        dist = np.linalg.norm(blocks[pairs_n[:, 0]] - blocks[pairs_n[:, 1]], axis=1)
        done = greedy_merges(
            pairs_n[np.argsort(dist, kind="stable")], rep, absorbed, need - merged, chain=True
        )
        merged += len(done)
        report["neighbour_merges"] += len(done)
        if not len(done):  # cannot happen while two served blocks remain
            break
    while True:  # last-resort merges may chain: point every block at its final block
        nxt = rep[rep]
        if np.array_equal(nxt, rep):
            break
        rep = nxt
    return rep, report


@register
class Dedup(Compressor):
    """Trains as ``full``, then LSH block deduplication to the budget (see module docstring)."""

    name = "dedup"
    option_help = {
        "block_rows": "consecutive rows per block R (None: the smallest power of two whose "
        "remap, 4 bytes a block, takes at most a quarter of the budget)",
        "fp": "entries within fp of each other count as equal (doubled until the budget is met)",
        "sim": "a pair merges when at least this share of entries are equal",
        "rounds": "passes over the LSH candidates, fp doubling after each",
        "lsh_bands": "LSH bands (a pair sharing a bucket in any band is a candidate)",
        "lsh_hashes": "p-stable hashes per band",
        "lsh_width": "bucket width relative to the projections' standard deviation",
        "finetune_epochs": "epochs of training after deduplication (None: the run's epochs, "
        "as the reference; 0: none)",
        "storage": "serving dtype of the distinct blocks: fp32, fp16, int8, int4 or int2",
    }

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        dim: int,
        budget_bytes: int,
        block_rows: int | None = None,
        fp: float = 0.01,
        sim: float = 0.7,
        rounds: int = 8,
        lsh_bands: int = 16,
        lsh_hashes: int = 2,
        lsh_width: float = 0.5,
        finetune_epochs: float | None = None,
        storage: str = "fp32",
        init_scale: float = 0.01,
        seed: int = 0,
    ) -> None:
        super().__init__(features, dim, budget_bytes)
        offsets, rows = [], 0
        for f in self.features:
            offsets.append(rows)
            rows += f.cardinality
        if block_rows is None:
            block_rows = solve_block_rows(rows, budget_bytes)
        if block_rows < 1 or fp < 0 or not 0.0 <= sim <= 1.0 or rounds < 0:
            raise ValueError(
                f"dedup: need block_rows >= 1, fp >= 0, 0 <= sim <= 1 and rounds >= 0, got "
                f"{block_rows}, {fp}, {sim}, {rounds}"
            )
        if lsh_bands < 1 or lsh_hashes < 1 or lsh_width <= 0:
            raise ValueError("dedup: lsh_bands and lsh_hashes must be >= 1, lsh_width > 0")
        check_dtype(storage, dim)
        self.storage = storage
        self.block_rows = block_rows
        self.settings = {
            "fp": fp,
            "sim": sim,
            "rounds": rounds,
            "bands": lsh_bands,
            "hashes": lsh_hashes,
            "width": lsh_width,
            "seed": seed,
        }
        self.rows = rows
        self.offsets = offsets
        self.blocks = block_count(rows, block_rows)
        self.keep = self._solve_keep()
        self.finetune_epochs = finetune_epochs
        if finetune_epochs is not None and finetune_epochs < 0:
            raise ValueError(f"dedup: finetune_epochs must be >= 0, got {finetune_epochs}")
        self.stages = (Stage("train"), Stage("dedup", trains=False)) + (
            (Stage("finetune", epochs=finetune_epochs),)
            if finetune_epochs is None or finetune_epochs > 0
            else ()
        )
        names = self.feature_names
        # Training reads block b at its own rows until the stage points it elsewhere.
        self.index_map = BlockRemapMap(
            names, offsets, block_rows, torch.arange(self.blocks, dtype=torch.int32), self.blocks
        )
        self.tables = TrainTables(
            [TableSpec(TABLE, self.blocks * block_rows, dim)],
            [Lookup(n, TABLE, field=i) for i, n in enumerate(names)],
            init_scale=init_scale,
        )
        self.register_buffer("deduplicated", torch.tensor(False))
        self.report: dict[str, Any] = {}

    def _block_bytes(self) -> int:
        return self.block_rows * row_bytes(self.dim, self.storage)

    def _solve_keep(self) -> int:
        remap = self.blocks * REMAP_BYTES
        keep = min(self.blocks, (self.budget_bytes - remap) // self._block_bytes())
        # The last block is never merged, so two distinct blocks are the least it reaches.
        if keep < min(2, self.blocks):
            floor = remap + min(2, self.blocks) * self._block_bytes()
            raise BudgetError(
                f"dedup: {min(2, self.blocks)} block(s) of {self.block_rows} rows at "
                f"{self.storage} and the remap ({self.blocks} blocks x 4 bytes) need "
                f"{describe_bytes(floor)}, but the budget is "
                f"{describe_bytes(self.budget_bytes)} "
                f"({self.full_bytes / self.budget_bytes:.1f}x); fewer block_rows shrink the "
                "block, more shrink the remap"
            )
        return int(keep)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        mapped = self.index_map(features)
        return self.tables(mapped).view(-1, self.num_features, self.dim)

    def run_stage(self, stage: Stage, ctx: StageContext) -> None:
        if stage.name != "dedup":
            return super().run_stage(stage, ctx)
        self.apply_dedup()

    def apply_dedup(self) -> None:
        """Merges the trained table's blocks down to the budget's count (deterministic)."""
        weight = self.tables.weights()[TABLE].detach().float()
        blocks = weight.reshape(self.blocks, -1).cpu().numpy()  # the merge runs on the host
        s = self.settings
        rep, self.report = deduplicate(
            blocks,
            self.keep,
            s["fp"],
            s["sim"],
            s["rounds"],
            s["bands"],
            s["hashes"],
            s["width"],
            s["seed"],
        )
        with torch.no_grad():
            self.index_map.remap.copy_(torch.from_numpy(rep).to(torch.int32))
        self.deduplicated.fill_(True)

    def served_blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the representatives' original block ids, every block's compact remap): ``keep``
        blocks, padded with unmerged spares when fewer merges were needed. On the host (what
        the artifact stores)."""
        rep = self.index_map.remap.long().cpu()
        distinct = torch.unique(rep)
        if len(distinct) < self.keep:
            free = torch.ones(self.blocks, dtype=torch.bool)
            free[distinct] = False
            spare = torch.nonzero(free).flatten()
            distinct = torch.cat([distinct, spare[: self.keep - len(distinct)]]).sort().values
        compact = torch.full((self.blocks,), -1, dtype=torch.long)
        compact[distinct] = torch.arange(len(distinct))
        return distinct, compact[rep].to(torch.int32)

    def memory(self) -> MemoryReport:
        table = TableSpec(TABLE, self.keep * self.block_rows, self.dim, self.storage)
        parts = {f"table.{TABLE}": table.serve_bytes, "index_map.remap": self.blocks * 4}
        train = TableSpec(TABLE, self.blocks * self.block_rows, self.dim).train_bytes(
            self.table_optimizer
        )
        return MemoryReport(
            serve_bytes=sum(parts.values()),
            train_bytes=train + self.blocks * REMAP_BYTES,
            full_bytes=self.full_bytes,
            parts=parts,
        )

    def plan_details(self) -> dict[str, Any]:
        return {"blocks": self.blocks, "keep": self.keep, "block_rows": self.block_rows}

    def export(self) -> ExportedEmbedding:
        if not bool(self.deduplicated) and self.keep < self.blocks:
            raise ValueError("dedup: the dedup stage has not run; train the run to its end")
        distinct, remap = self.served_blocks()
        weight = self.tables.weights()[TABLE].detach().reshape(self.blocks, self.block_rows, -1)
        rows = weight[distinct.to(weight.device)].reshape(-1, self.dim).cpu()
        table = TableSpec(TABLE, len(distinct) * self.block_rows, self.dim, self.storage)
        index_map = BlockRemapMap(
            self.feature_names, self.offsets, self.block_rows, remap, len(distinct)
        )
        lookups = [Lookup(n, TABLE, field=i) for i, n in enumerate(self.feature_names)]
        return ExportedEmbedding(
            kind=TABLE_KIND,
            config={
                "method": self.name,
                "dim": self.dim,
                "num_fields": self.num_features,
                "op": "sum",
                "index_map": index_map.to_config(),
                "tables": [table.to_json()],
                "lookups": [lk.to_json() for lk in lookups],
            },
            tensors={f"table.{TABLE}": pack_rows(rows, self.storage), "index_map.remap": remap},
        )

    def set_storage(self, dtype: str) -> None:
        """Serves the distinct blocks at ``dtype`` (the same blocks and remap)."""
        check_dtype(dtype, self.dim)
        self.storage = dtype

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "block_rows": self.block_rows,
            "blocks": self.blocks,
            "keep": self.keep,
            "storage": self.storage,
            "finetune_epochs": self.finetune_epochs,
            "deduplicated": bool(self.deduplicated),
            **self.report,
        }
