"""What ``--help`` and ``ctr methods`` tell a new user: whole sentences, every default, every
sweep-spec field."""

from __future__ import annotations

import argparse
import dataclasses
from argparse import SUPPRESS
from typing import Any

from ctr.cli import build_parser, main
from ctr.sweep import ProtocolConfig, SweepSpec
from tests.helpers import ROOT


def _subparsers(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, Any]:
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[f"{prefix}{name}"] = sub
                out.update(_subparsers(sub, f"{prefix}{name} "))
    return out


def test_methods_lists_a_whole_sentence_for_every_method(capsys):
    assert main(["methods"]) == 0
    summaries = [line for line in capsys.readouterr().out.splitlines() if line[:1] != " "]
    assert len(summaries) >= 19
    for line in summaries:
        name, _, text = line.partition(" ")
        text = text.strip()
        assert len(text) >= 20 and text.endswith("."), (name, text)
        assert "docstring" not in text, (name, text)


def test_every_default_is_in_the_help():
    commands = _subparsers(build_parser())
    for name in ("synth", "train", "export", "predict", "serve", "demo", "sweep run"):
        sub = commands[name]
        formatter = sub._get_formatter()
        for action in sub._actions:
            if not action.option_strings or action.default in (None, True, False, "", SUPPRESS):
                continue
            text = formatter._expand_help(action) if action.help else ""
            assert "default" in text and str(action.default) in text, (name, action.dest, text)
    assert "(default: 1000000)" in commands["demo"].format_help()


def test_every_sweep_spec_field_is_documented():
    doc = (ROOT / "docs" / "sweep-spec.md").read_text()
    epilog = " ".join(_subparsers(build_parser())["sweep run"].format_help().split())
    for cls in (SweepSpec, ProtocolConfig):
        for f in dataclasses.fields(cls):
            assert f"`{f.name}`" in doc, f.name
            assert f.name in epilog, f.name


def test_train_and_serve_flags_default_to_their_configs(tiny_data):
    # One source of defaults: a flag's default is its config field's, never a second literal.
    from ctr.cli.train import _run_config
    from ctr.serving.http.config import ServeConfig
    from ctr.training.run import RunConfig
    from ctr.training.trainer import TrainConfig

    args = build_parser(["train"]).parse_args(["train", "--data", str(tiny_data), "--out", "r"])
    # Picked per run: the batch size from the data, the table optimizer and lr from the method.
    per_run = {"batch_size": None, "table_lr": None, "table_optimizer": "auto"}
    flags = [f.name for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)]
    assert {"epochs", "lr", "eval_every", "patience", "seed", "max_steps"} <= set(flags)
    for name in flags:
        assert getattr(args, name) == per_run.get(name, getattr(TrainConfig(), name)), name
    for name in ("model", "compressor", "budget", "dim"):
        assert getattr(args, name) == getattr(RunConfig(data=""), name), name
    # And every flag reaches the config: only what is picked per run differs.
    args.batch_size = TrainConfig().batch_size
    train = _run_config(args).train
    differs = {
        f.name
        for f in dataclasses.fields(TrainConfig)
        if getattr(train, f.name) != getattr(TrainConfig(), f.name)
    }
    assert differs <= {"table_lr", "table_optimizer", "progress"}, differs

    args = build_parser(["serve"]).parse_args(["serve", "artifact"])
    config = ServeConfig()
    for f in dataclasses.fields(ServeConfig):
        if hasattr(args, f.name):
            assert getattr(args, f.name) == getattr(config, f.name), f.name
    assert args.max_body_mb * (1 << 20) == config.max_body_bytes
