"""Generic serving options (``ctr serve --serving-opt kind.option=value``) and the typed
manifest: keys are checked against what the serving modules accept, with a one-line error
naming the flag; ``--binary-decode`` still maps to ``binary.decode``; the options reach the
served model; ``Manifest`` round-trips the file's JSON."""

from __future__ import annotations

import json

import pytest
import torch

from compressors.core.base import Stage
from ctr import EmbeddingLayer, build_model, export, features_from_dataset
from ctr.cli import build_parser, main
from ctr.serving.http.config import ServeConfig, parse_serving_options
from ctr.serving.manifest import MANIFEST_FILE, ArtifactError, Manifest, load_manifest


def test_a_known_option_becomes_the_serving_modules_keyword():
    config = ServeConfig(serving_options=parse_serving_options(["binary.decode=auto"]))
    assert config.module_options() == {"binary": {"decode": "auto"}}
    assert ServeConfig().module_options() == {}


@pytest.mark.parametrize(
    "item, message",
    [
        (
            "binary.decod=auto",
            r"--serving-opt binary\.decod: unknown serving option; "
            r"accepted: binary\.decode, binary\.plane_dtype",
        ),
        ("hash.decode=auto", r"--serving-opt hash\.decode: unknown"),
        ("decode=auto", r"--serving-opt 'decode=auto': expected <kind>\.<option>=<value>"),
        ("binary.decode", r"expected <kind>\.<option>=<value>"),
    ],
)
def test_a_bad_option_is_one_line_naming_the_flag_and_the_accepted_keys(item, message):
    with pytest.raises(ValueError, match=message) as e:
        ServeConfig(serving_options=parse_serving_options([item]))
    assert "\n" not in str(e.value)


def test_the_cli_refuses_a_bad_option_before_loading(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "absent"), "--serving-opt", "binary.nope=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --serving-opt binary.nope") and "binary.decode" in err


def test_serve_flags_default_to_serveconfig_and_the_old_flag_is_an_alias(monkeypatch, capsys):
    import ctr.serving.http.app as app

    seen = {}
    monkeypatch.setattr(app, "serve", lambda source, host, port, config: seen.update(c=config))
    args = build_parser().parse_args(["serve", "a"])
    assert args.max_batch == ServeConfig.max_batch and args.workers == ServeConfig.workers
    assert main(["serve", "a"]) == 0
    assert seen["c"] == ServeConfig()
    assert main(["serve", "a", "--binary-decode", "auto"]) == 0
    assert seen["c"].serving_options == {"binary.decode": "auto"}
    assert "deprecated" in capsys.readouterr().err
    # --serving-opt wins over the deprecated flag.
    main(["serve", "a", "--binary-decode", "auto", "--serving-opt", "binary.decode=rows"])
    assert seen["c"].serving_options == {"binary.decode": "rows"}


def test_options_reach_the_served_model_and_the_manifest_round_trips(tiny_data, tmp_path):
    from ctr.serving.http.models import load_served

    torch.manual_seed(0)
    layer = EmbeddingLayer(features_from_dataset(tiny_data), 8, "binary", "10x", init_scale=0.1)
    layer.compressor.run_stage(Stage("binarize", trains=False), None)
    model = build_model("deepfm", layer, 3, hidden=[16]).eval()
    written = export(model, tmp_path / "a", dataset=tiny_data, extra={"run": {"dir": "r"}})
    stored = json.loads((tmp_path / "a" / MANIFEST_FILE).read_text())
    assert written == stored
    manifest = load_manifest(tmp_path / "a")
    assert manifest.to_json() == stored and list(manifest.to_json()) == list(stored)
    assert manifest.extra == {"run": {"dir": "r"}} and manifest.method == "binary"
    with pytest.raises(ArtifactError, match="lacks 'tensors'"):
        Manifest.from_json({k: v for k, v in stored.items() if k != "tensors"}, "m.json")

    exact = load_served(tmp_path / "a")
    assert exact.model.resident_bytes == manifest.serve_bytes
    config = ServeConfig(serving_options={"binary.decode": "auto"})
    fast = load_served(tmp_path / "a", config.module_options())
    assert fast.model.resident_bytes > manifest.serve_bytes
    assert fast.metadata()["footprint"] == manifest.footprint()
    with pytest.raises(ArtifactError, match=r"serving options \{'decode': 'fast'\}"):
        load_served(tmp_path / "a", {"binary": {"decode": "fast"}})
