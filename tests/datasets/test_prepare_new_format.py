"""Adding a raw format end to end, as a newcomer would.

The files a new format touches: its module (here ``tests/fixtures/readers/toy.py``, in the
repository ``datasets/readers/<name>.py``) and one line of ``datasets/readers/registry.py``
(its name in ``MODULES``; here the same registration done by the fixture). Then
``ctr prepare toy`` prepares it, ``ctr train`` learns from it, and serving encodes raw
records of it exactly as the prepared split holds them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import datasets.readers
from ctr.cli import main
from datasets.encode import RawEncoder
from datasets.prepared import DatasetMeta, load_vocab
from datasets.readers import registry
from tests.helpers import FIXTURES

FIXTURE = FIXTURES / "readers"
HOT = {"p0", "p1", "p2"}  # pages that are clicked far more often: the signal to learn


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr(datasets.readers, "__path__", [*datasets.readers.__path__, str(FIXTURE)])
    monkeypatch.delitem(sys.modules, "datasets.readers.toy", raising=False)
    # The one registry line a new format adds (its name in registry.MODULES).
    monkeypatch.setitem(registry.READERS, "toy", registry.load("toy"))
    yield
    sys.modules.pop("datasets.readers.toy", None)


def _log(path: Path, rows: int = 4000) -> Path:
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(rows):
        page = f"p{rng.integers(12)}"
        clicked = int(rng.random() < (0.8 if page in HOT else 0.1))
        lines.append(f"{clicked}|u{rng.integers(40)}|{page}|{rng.integers(0, 300)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_new_format_is_one_module_and_one_line(toy, tmp_path, capsys):
    assert "toy click logs" in _prepare_help(capsys)
    data = tmp_path / "data"
    assert main(["prepare", "toy", str(_log(tmp_path / "clicks.log")), "--out", str(data),
                 "--no-progress"]) == 0  # fmt: skip
    meta = DatasetMeta.load(data)
    assert meta.options["format"] == "toy"
    assert meta.dense == ["dwell"] and meta.sparse_names == ["user", "page"]
    assert sum(meta.rows(s) for s in ("train", "valid", "test")) == 4000

    run = tmp_path / "run"
    flags = ["--dim", "4", "--batch-size", "256", "--model-opt", "hidden=[8]", "--no-progress"]
    assert main(["train", "--data", str(data), "--out", str(run), "--lr", "0.05", *flags]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_auc"] > 0.8  # the hot pages are learnt

    # Serving rebuilds the format from meta.json through the registry.
    encoder = RawEncoder.load(data)
    encoded = encoder.encode([{"user": "u3", "page": "p1", "dwell": 12}, {"page": "nope"}])
    vocab = load_vocab(data)
    assert encoded.sparse["page"].tolist() == [vocab["page"]["p1"], 0]
    assert encoded.sparse["user"].tolist() == [vocab["user"]["u3"], 0]
    assert encoded.dense[:, 0].tolist() == pytest.approx([np.log1p(12), 0.0])


def _prepare_help(capsys) -> str:
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    return capsys.readouterr().out


def test_without_the_registry_line_there_is_no_toy(capsys):
    assert "toy" not in registry.READERS
    with pytest.raises(SystemExit):
        main(["prepare", "toy", "x", "--out", "y"])
    assert "invalid choice: 'toy'" in capsys.readouterr().err
