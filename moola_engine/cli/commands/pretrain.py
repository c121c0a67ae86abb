"""``moola-engine pretrain --config FILE``: run the experiment's pretraining objective, write the encoder.

The objective is a plugin (``register_objectives``) or an import path, named by
``[pretrain] objective`` in the experiment file or ``--objective``; its parameters
come from ``[pretrain.params]``, and the common ones can be overridden here
(``--epochs``, ``--lr``, ...) or any one with ``--param KEY=VALUE``.  The output is
``<out>.safetensors`` plus a ``<out>.json`` sidecar that states which data the
encoder saw (``cut_date`` for time-ordered data), so a fine-tuning run can refuse
an encoder that saw its validation or test period.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from moola_engine.cli.commands.argtypes import positive_float, positive_int, seed_int, writable_output
from moola_engine.config import ExperimentConfig, load_config, parse_toml, structure
from moola_engine.core.components import default_registries
from moola_engine.core.registry import resolve
from moola_engine.errors import ConfigError

COMMON = ("epochs", "lr", "batch_size", "seed", "device", "threads")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = sub.add_parser("pretrain", help="run a pretraining objective on the experiment's data; writes the encoder")
    p.add_argument("--config", help="experiment TOML: its [data] and [model], and [pretrain] objective/params")
    p.add_argument("--objective", help="objective name or import path (default: [pretrain] objective)")
    p.add_argument("--out", help="output .safetensors; the sidecar .json and the .events.jsonl log go beside it "
                                 "(default: [model.pretrained] path of the config, else artifacts/encoder.safetensors beside it)")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing encoder file (refused otherwise: runs may have been trained from it)")
    p.add_argument("--epochs", type=positive_int, help="override the objective's epochs")
    p.add_argument("--lr", type=positive_float, help="override the objective's learning rate")
    p.add_argument("--batch-size", type=positive_int, help="override the objective's batch size")
    p.add_argument("--seed", type=seed_int, help="override the objective's seed")
    p.add_argument("--device", help='override the objective\'s device: "auto", "cpu", "cuda", "cuda:N" or "mps"')
    p.add_argument("--threads", type=positive_int, help="override the objective's torch CPU threads")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="set one objective parameter (a TOML value: 64, 0.5, \"text\", [1, 2]); repeatable")
    p.add_argument("--console", choices=["pretty", "json", "none"], default="pretty",
                   help="console output: pretty lines, JSON lines, or none (default: %(default)s)")
    return p


def _params(args: argparse.Namespace, cfg: ExperimentConfig, comp: Any) -> Any:
    table: dict[str, Any] = dict(cfg.pretrain.params)
    for key in COMMON:
        value = getattr(args, key)
        if value is not None:
            table[key] = value
    for item in args.param:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError("--param", f"expected KEY=VALUE, got {item!r}")
        try:
            table[key.strip()] = parse_toml(f"v = {raw}", "--param")["v"]
        except ConfigError:
            table[key.strip()] = raw  # a bare word: a string
    if comp.params is None:
        return table
    return structure(table, comp.params, source=f"{cfg.source} [pretrain.params] / command line",
                     path="$.pretrain.params")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config) if args.config else ExperimentConfig()
    if args.out:
        out = Path(args.out)
    elif cfg.model.pretrained is not None:
        out = cfg.resolve(cfg.model.pretrained.path)
    else:
        out = cfg.resolve("artifacts/encoder.safetensors")  # beside the experiment file (the cwd without one)
    try:
        out = out.with_suffix(".safetensors")
    except ValueError as exc:  # "", "/", a name without a stem
        raise ConfigError("--out", f"expected a file name like artifacts/encoder.safetensors, got {str(out)!r} "
                                   f"({exc})") from None
    writable_output(out.with_suffix(".events.jsonl"), flag="--out", is_dir=False)  # before any data is read
    if out.exists() and not args.force:
        raise ConfigError("--out", f"{out} exists: runs may have been trained from it. Pass --force to overwrite it, "
                                   "or choose another --out")
    name = args.objective or cfg.pretrain.objective
    objectives = default_registries()["objective"]
    if name is None:
        raise ConfigError(cfg.source, "no pretraining objective: set [pretrain] objective = \"NAME\" or pass "
                                      f"--objective NAME (installed: {', '.join(objectives.names()) or 'none'})")
    comp = resolve(objectives, name, source=cfg.source if not args.objective else "--objective",
                   key="$.pretrain.objective", base_dir=cfg.base_dir)
    objective = comp.factory(_params(args, cfg, comp))
    result = objective.pretrain(cfg, out=out, console=args.console)
    summary = f"  ({result['summary']})" if result.get("summary") else ""
    print(f"encoder: {result['encoder']}  sidecar: {result['sidecar']}{summary}")
    return 0
