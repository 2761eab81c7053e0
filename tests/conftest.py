"""Shared fixtures: small synthetic datasets generated once per session."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from datasets.synthetic import SyntheticConfig, generate_synthetic

logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
# `--device auto` means the CPU here, on any machine (subprocesses inherit it): the suite
# checks the CPU path; tests marked `cuda` name their device.
os.environ.setdefault("CTR_DEVICE", "cpu")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` need a CUDA device: skipped where torch sees none."""
    marked = [item for item in items if item.get_closest_marker("cuda")]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in marked:
        item.add_marker(skip)


# Few values per field so a model can approach the teacher with a few hundred thousand rows.
SMALL_CARDINALITIES = (40, 120, 600, 25, 300, 80, 15, 1000)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5k rows, 8 fields, 3 dense features, one multi-hot field: for shape and format tests."""
    out = tmp_path_factory.mktemp("tiny")
    generate_synthetic(
        out,
        SyntheticConfig(
            rows=5_000,
            cardinalities=SMALL_CARDINALITIES[:7],
            num_dense=3,
            multi_hot_fields=1,
            chunk_rows=2048,
            rows_per_shard=1500,
        ),
        progress=False,
    )
    return out


@pytest.fixture(scope="session")
def learn_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """400k rows with small vocabularies: enough for a model to come close to the teacher."""
    out = tmp_path_factory.mktemp("learn")
    generate_synthetic(
        out,
        SyntheticConfig(rows=400_000, cardinalities=SMALL_CARDINALITIES, num_dense=4),
        progress=False,
    )
    return out


@pytest.fixture(scope="session")
def control_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``learn_data`` without the planted field signal: the teacher's per-value biases and
    interactions are off, so labels depend on the dense features only and every field is
    noise. The negative control of tests that find the planted signal."""
    out = tmp_path_factory.mktemp("control")
    generate_synthetic(
        out,
        SyntheticConfig(
            rows=400_000,
            cardinalities=SMALL_CARDINALITIES,
            num_dense=4,
            bias_std=0.0,
            interaction_std=0.0,
        ),
        progress=False,
    )
    return out
