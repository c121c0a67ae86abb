"""``moola-engine export RUN --module encoder --out encoder.safetensors``: a run's final weights, or part of them.

RUN is a run id (or a unique prefix) under ``--runs-dir``, a run folder, or ``latest``.  The weights are the
run's ``model.safetensors`` (written when training ends: the weights ``fit`` ended with), else its newest
checkpoint's (a run that was interrupted).  ``--module`` selects group names, group-name prefixes (``encoder``
selects every ``encoder.*`` group) or submodule paths, comma-separated; ``--module encoder`` of a model whose
groups are not named ``encoder.*`` means every tensor outside the head groups.  Keys keep the model's names,
so the file loads into the same model as ``[model.pretrained] path = ...``.  A ``.json`` sidecar beside it
names the run, the tensors and the data the run trained on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moola_engine.cli.commands.argtypes import writable_output
from moola_engine.errors import ConfigError, MoolaError

RUN_REF = "a run id (folder name under --runs-dir, or a unique prefix of one), a run folder path, or 'latest'"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="write a run's final weights (or one module of them) as .safetensors",
                       description="Write a run's final weights, or the groups/modules --module names, to a "
                                   ".safetensors file with a .json sidecar.")
    p.add_argument("run", metavar="RUN", help=RUN_REF)
    p.add_argument("--runs-dir", default="runs", metavar="DIR", help="the folder holding run folders (default: ./runs)")
    p.add_argument("--module", default="all", metavar="NAMES",
                   help="comma-separated group names, group-name prefixes or submodule paths; 'encoder': every "
                        "tensor outside the head groups unless groups are named encoder.*; 'all': every tensor "
                        "(default: %(default)s)")
    p.add_argument("--out", required=True, help="output .safetensors file (its .json sidecar goes beside it)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    return p


def run(args: argparse.Namespace) -> int:
    from moola_engine.runs.exporting import export_run
    from moola_engine.runs.index import resolve_run

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ConfigError("--out", f"expected a file name ending in .safetensors, got {str(out)!r}")
    writable_output(out, flag="--out", is_dir=False)
    if out.exists() and not args.force:
        raise ConfigError("--out", f"{out} exists; pass --force to overwrite it, or choose another --out")
    run_dir = resolve_run(args.run, args.runs_dir)
    names = [m.strip() for m in args.module.split(",") if m.strip()]
    if not names:
        raise ConfigError("--module", "expected one or more names, e.g. encoder or encoder.block1,encoder.block2")
    try:
        result = export_run(run_dir, None if names == ["all"] else names, out)
    except MoolaError:
        raise
    print(f"exported {result['tensors']} tensors ({result['source']}) -> {result['path']}  sidecar: {result['sidecar']}")
    return 0
