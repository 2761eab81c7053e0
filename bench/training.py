"""Training speed sections: ``train`` (DeepFM + full against plain PyTorch), ``vs_torchrec``
(ctr's DLRM against TorchRec's own under DMP), ``profile_step`` and ``dmp_scaling``."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# torch's in-backward optimizer hook: the API TorchRec's own (deprecated) wrapper points to.
from torch.distributed.optim import _apply_optimizer_in_backward
from torch.profiler import ProfilerActivity, profile
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.planner import (
    EmbeddingShardingPlanner,
    ParameterConstraints,
    Topology,
)
from torchrec.distributed.types import ShardingEnv, ShardingType
from torchrec.models.dlrm import DLRM
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.optimizers import in_backward_optimizer_filter

from bench.common import CACHE, cached_run, default_dataset, print_table, timed_steps
from ctr.models.layers import FirstOrder, fm_interaction, mlp
from ctr.training.run import RunConfig, build_run_model
from ctr.training.trainer import TrainConfig, Trainer, table_modules
from datasets.loader import BatchLoader
from datasets.prepared import DatasetMeta


class PlainDeepFM:
    """The plain-PyTorch baseline: ``nn.EmbeddingBag`` per field with sparse gradients, same
    first-order/FM/MLP as ``ctr``'s DeepFM. ``table_optimizer``: ``"sparse_adam"`` (the
    strongest plain setting) or ``"adagrad"`` (torch's sparse Adagrad: the same family as
    ``ctr``'s fused rowwise Adagrad)."""

    def __init__(
        self,
        meta: object,
        dim: int,
        hidden: list[int],
        lr: float = 1e-3,
        table_optimizer: str = "sparse_adam",
        table_lr: float = 0.05,
    ) -> None:

        self.names = [f.name for f in meta.sparse]
        self.bags = nn.ModuleList(
            [nn.EmbeddingBag(f.cardinality, dim, mode="sum", sparse=True) for f in meta.sparse]
        )
        self.linear = FirstOrder(len(self.names), dim, len(meta.dense))
        self.deep = mlp(len(self.names) * dim + len(meta.dense), hidden, 1)
        dense = list(self.linear.parameters()) + list(self.deep.parameters())
        tables = list(self.bags.parameters())
        self.opts = [
            torch.optim.SparseAdam(tables, lr=lr)
            if table_optimizer == "sparse_adam"
            else torch.optim.Adagrad(tables, lr=table_lr),
            torch.optim.Adam(dense, lr=lr),
        ]

    def step(self, batch: object) -> float:

        kjt = batch.sparse_features
        emb = torch.stack(
            [
                bag(kjt[n].values(), kjt[n].offsets()[:-1])
                for bag, n in zip(self.bags, self.names, strict=True)
            ],
            dim=1,
        )
        dense = batch.dense_features
        deep = self.deep(torch.cat([emb.flatten(1), dense], 1)).squeeze(1)
        logits = self.linear(emb, dense) + fm_interaction(emb) + deep
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        for o in self.opts:
            o.zero_grad()
        loss.backward()
        for o in self.opts:
            o.step()
        return loss.item()


def bench_train(args: argparse.Namespace) -> dict:
    """DeepFM + full on the default synthetic data: AUC vs teacher, speed vs plain PyTorch."""
    data = default_dataset(args)
    meta = DatasetMeta.load(data)
    summary = cached_run("deepfm-full-1x", data=str(data), model="deepfm", compressor="full")
    teacher = meta.extra["teacher"]["test_auc"]

    loader = BatchLoader(meta, "train", batch_size=4096, shuffle=True)
    start = time.perf_counter()
    rows = sum(len(b.labels) for b in loader.epoch(0))
    loader_cold = rows / (time.perf_counter() - start)
    start = time.perf_counter()
    rows = sum(len(b.labels) for b in loader.epoch(1))
    loader_warm = rows / (time.perf_counter() - start)

    batches = [b for _, b in zip(range(41), loader.epoch(2), strict=False)]
    ours = Trainer(
        build_run_model(RunConfig(data=str(data))),
        loader,
        BatchLoader(meta, "valid"),
        TrainConfig(progress=False),
    )
    plain = PlainDeepFM(meta, 16, [400, 400, 400])
    plain_adagrad = PlainDeepFM(meta, 16, [400, 400, 400], table_optimizer="adagrad")
    speeds = {"ctr": [], "plain": [], "plain_adagrad": []}
    for _ in range(2):  # interleaved, so drift on a shared machine hits all alike
        speeds["ctr"].append(timed_steps(ours.train_step, batches))
        speeds["plain"].append(timed_steps(plain.step, batches))
        speeds["plain_adagrad"].append(timed_steps(plain_adagrad.step, batches))
    ctr_sps, plain_sps = max(speeds["ctr"]), max(speeds["plain"])
    adagrad_sps = max(speeds["plain_adagrad"])
    rows_out = [
        {"what": "DeepFM full test AUC", "value": summary["test_auc"]},
        {"what": "teacher test AUC (ceiling)", "value": teacher},
        {"what": "AUC gap to teacher", "value": teacher - summary["test_auc"]},
        {"what": "DeepFM full test logloss", "value": summary["test_logloss"]},
        {"what": "ctr train samples/s (fused fbgemm)", "value": ctr_sps},
        {"what": "plain PyTorch samples/s (SparseAdam)", "value": plain_sps},
        {"what": "plain PyTorch samples/s (sparse Adagrad)", "value": adagrad_sps},
        {"what": "throughput ratio ctr / plain SparseAdam", "value": ctr_sps / plain_sps},
        {
            "what": "throughput ratio ctr / plain Adagrad (same family)",
            "value": ctr_sps / adagrad_sps,
        },
        {"what": "loader rows/s (first epoch, decode)", "value": loader_cold},
        {"what": "loader rows/s (cached)", "value": loader_warm},
    ]
    print_table("train: DeepFM + full, default synthetic data", rows_out)
    return {
        "summary": summary,
        "teacher_auc": teacher,
        "ctr_samples_per_sec": ctr_sps,
        "plain_samples_per_sec": plain_sps,
        "ratio": ctr_sps / plain_sps,
        "plain_adagrad_samples_per_sec": adagrad_sps,
        "ratio_same_optimizer_family": ctr_sps / adagrad_sps,
        "loader_rows_per_sec_cold": loader_cold,
        "loader_rows_per_sec_warm": loader_warm,
    }


# ----------------------------------------------------------------------------- preprocessing


VS_TORCHREC_SCALES = {"large": 0.16, "small": 0.002}  # Criteo profile scales
DLRM_BOTTOM, DLRM_TOP = [64], [256, 128]


def _torchrec_dlrm_step(meta: object, lr: float, table_lr: float) -> Callable[[object], float]:
    """TorchRec's own DLRM (dense arch [64, D], over arch [256, 128, 1]) in DMP on one gloo
    rank: tables table-wise with fbgemm's fused rowwise Adagrad, dense parameters on Adam."""
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        dist.init_process_group("gloo", rank=0, world_size=1)
    dim = 16
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name=f"t_{f.name}",
                num_embeddings=f.cardinality,
                embedding_dim=dim,
                feature_names=[f.name],
            )
            for f in meta.sparse
        ],
        device=torch.device("meta"),
    )
    model = DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=len(meta.dense),
        dense_arch_layer_sizes=[*DLRM_BOTTOM, dim],
        over_arch_layer_sizes=[*DLRM_TOP, 1],
    )
    _apply_optimizer_in_backward(RowWiseAdagrad, ebc.parameters(), {"lr": table_lr})
    constraints = {
        f"t_{f.name}": ParameterConstraints(
            sharding_types=[ShardingType.TABLE_WISE.value], compute_kernels=["fused"]
        )
        for f in meta.sparse
    }
    plan = EmbeddingShardingPlanner(
        topology=Topology(world_size=1, compute_device="cpu"), constraints=constraints
    ).collective_plan(model, None, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
        device=torch.device("cpu"),
        plan=plan,
    )
    dense = [p for _, p in in_backward_optimizer_filter(dmp.named_parameters())]
    adam = torch.optim.Adam(dense, lr=lr)

    def step(batch: object) -> float:
        dmp.train()
        logits = dmp(batch.dense_features, batch.sparse_features).squeeze(1)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        adam.zero_grad()
        loss.backward()
        adam.step()
        return loss.item()

    return step


def _set_direct_lookups(model: nn.Module, direct: list | None) -> list:
    """Sets the fused tables' direct fbgemm lookups (``None``: lookups through TorchRec's
    ``FusedEmbeddingBagCollection.forward``); returns the previous ones.

    The one place bench touches a private attribute (``TrainTables._direct``): the tables
    offer no public switch for what this measures.
    """
    tables = table_modules(model)
    previous = [t._direct for t in tables]
    for t, d in zip(tables, direct or [None] * len(tables), strict=True):
        t._direct = d
    return previous


def _loop_stepper(trainer: object, loader: object, steps: int) -> Callable[[object], float]:
    """A ``timed_steps`` stepper that ignores its batch and trains on ``loader``'s next one
    instead (the loader's work inside the timing)."""
    state = {"batches": iter(())}

    def step(_: object) -> float:
        batch = next(state["batches"], None)
        if batch is None:
            state["batches"] = iter(loader.epoch(len(state) + 1))
            batch = next(state["batches"])
        return trainer.train_step(batch)

    return step


def bench_vs_torchrec(args: argparse.Namespace) -> dict:
    """Training throughput: ctr DLRM (full, and hash at 10x) vs TorchRec's DLRM under DMP."""

    rows_out, repeats, steps = [], 3, 20
    for scale in VS_TORCHREC_SCALES.values():
        # min_count=1: every generated value keeps its id (vocabularies at their full size).
        data = default_dataset(args, rows=args.rows or 300_000, scale=scale, min_count=1)
        meta = DatasetMeta.load(data)
        label = f"{sum(f.cardinality for f in meta.sparse) / 1000:,.0f}k ids"
        loader = BatchLoader(meta, "train", batch_size=4096, shuffle=True, drop_last=True)
        batches = [b for _, b in zip(range(steps + 1), loader.epoch(0), strict=False)]
        config = TrainConfig(progress=False)
        steppers = {
            "torchrec_dmp": _torchrec_dlrm_step(meta, config.lr, config.table_lr),
        }
        for method, budget in (("full", "1x"), ("hash", "10x")):
            run = RunConfig(
                data=str(data),
                model="dlrm",
                model_options={"bottom": DLRM_BOTTOM, "top": DLRM_TOP},
                compressor=method,
                budget=budget,
                train=config,
            )
            trainer = Trainer(build_run_model(run, meta), loader, loader, config)
            steppers[f"ctr_{method}"] = trainer.train_step
            if method == "full":  # the same, through TorchRec's FusedEmbeddingBagCollection.forward
                reference = Trainer(build_run_model(run, meta), loader, loader, config)
                _set_direct_lookups(reference.model, None)
                steppers["ctr_full_via_fused_ebc_forward"] = reference.train_step
        # ctr's whole loop, batches assembled by the loader inside the timing (as `ctr train`
        # sees them), without and with the background prefetch thread.
        loop_trainer = Trainer(
            build_run_model(
                RunConfig(
                    **{**run.to_json(), "compressor": "full", "budget": "1x", "train": config}
                ),
                meta,
            ),
            loader,
            loader,
            config,
        )
        for depth in (0, 2):
            feeding = BatchLoader(
                meta, "train", batch_size=4096, shuffle=True, drop_last=True, prefetch=depth
            )
            steppers[f"ctr_full_with_loader_prefetch{depth}"] = _loop_stepper(
                loop_trainer, feeding, steps
            )
        speeds: dict[str, list[float]] = {k: [] for k in steppers}
        for r in range(repeats):  # interleaved: drift on a shared machine hits every side alike
            for name, step in steppers.items():
                speeds[name].append(timed_steps(step, batches))
            print(
                f"  {label}: repeat {r + 1}/{repeats} "
                + ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in speeds.items()),
                flush=True,
            )
        med = {k: statistics.median(v) for k, v in speeds.items()}
        for name in (
            "ctr_full",
            "ctr_hash",
            "ctr_full_via_fused_ebc_forward",
            "ctr_full_with_loader_prefetch0",
            "ctr_full_with_loader_prefetch2",
        ):
            rows_out.append(
                {
                    "ids": label,
                    "ctr": name.removeprefix("ctr_"),
                    "ctr samples/s": med[name],
                    "torchrec DMP samples/s": med["torchrec_dmp"],
                    "ratio": med[name] / med["torchrec_dmp"],
                }
            )
    print_table(
        f"vs_torchrec: DLRM bottom {DLRM_BOTTOM} top {DLRM_TOP}, batch 4096, D=16, median of "
        f"{repeats} interleaved repeats of {steps} steps (same batches, fused rowwise Adagrad)",
        rows_out,
    )
    return {"rows": rows_out, "repeats": repeats, "steps": steps}


def bench_profile_step(args: argparse.Namespace) -> dict:
    """Top ops by self CPU time of ctr's DLRM train step (torch.profiler), with the fused
    tables called directly and through TorchRec's FusedEmbeddingBagCollection.forward."""

    data = default_dataset(
        args, rows=args.rows or 300_000, scale=VS_TORCHREC_SCALES["large"], min_count=1
    )
    meta = DatasetMeta.load(data)
    loader = BatchLoader(meta, "train", batch_size=4096, shuffle=True, drop_last=True)
    batches = [b for _, b in zip(range(12), loader.epoch(0), strict=False)]
    run = RunConfig(
        data=str(data), model="dlrm", model_options={"bottom": DLRM_BOTTOM, "top": DLRM_TOP}
    )
    trainer = Trainer(build_run_model(run, meta), loader, loader, TrainConfig(progress=False))
    direct = _set_direct_lookups(trainer.model, None)
    tables: dict[str, str] = {}
    for mode in ("torchrec_forward", "direct"):
        _set_direct_lookups(trainer.model, None if mode == "torchrec_forward" else direct)
        for b in batches[:2]:
            trainer.train_step(b)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for b in batches[2:]:
                trainer.train_step(b)
        tables[mode] = prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=50
        )
        print(f"profile_step: {mode}, {len(batches) - 2} steps\n{tables[mode]}")
    return {"tables": tables}


def bench_dmp_scaling(args: argparse.Namespace) -> dict:
    """Two-process DMP training (torchrun, gloo, 1 thread per rank) vs one process (2 threads)."""
    data = default_dataset(args, rows=args.rows or 300_000)
    results: dict[str, float] = {}
    for procs in (1, 2):
        out = CACHE / "runs" / f"dmp-scaling-{procs}"
        if out.exists():
            shutil.rmtree(out)  # the bench's own scratch run
        train = ["train", "--data", str(data), "--model", "dlrm", "--epochs", "0.5"]
        train += ["--batch-size", "4096", "--no-progress", "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": str(2 // procs)}
        if procs == 1:
            cmd = [sys.executable, "-m", "ctr.cli", *train]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
            cmd += ["-m", "ctr.cli", *train]
        subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
        results[f"{procs} process(es)"] = json.loads((out / "summary.json").read_text())[
            "samples_per_sec"
        ]
    ratio = results["2 process(es)"] / results["1 process(es)"]
    rows = [{"setup": k, "samples/s": v} for k, v in results.items()]
    rows.append({"setup": "ratio 2 / 1", "samples/s": ratio})
    print_table("dmp_scaling: DLRM + full, batch 4096 (global), 0.5 epoch", rows)
    return {"samples_per_sec": results, "ratio": ratio}
