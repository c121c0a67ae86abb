"""``moola-engine runs list|show|compare``: browse run folders and compare them, read back from their event logs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moola_engine.errors import MoolaError
from moola_engine.runs.index import (
    LIST_HEADER,
    RunInfo,
    compare_json,
    list_rows,
    read_run,
    read_runs,
    render_compare,
    render_show,
    resolve_run,
    run_folders,
    table,
)

RUN_REF = "a run id (folder name under --runs-dir, or a unique prefix of one), a run folder path, or 'latest'"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = sub.add_parser("runs", help="list, show and compare run folders (read back from their event logs)",
                       description="Browse run folders: list them, show one run's plan against what happened, "
                                   "compare runs' metrics and freeze timelines.")
    verbs = p.add_subparsers(dest="runs_command", required=True, metavar="ACTION")

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--runs-dir", default="runs", metavar="DIR",
                       help="the folder holding run folders (default: ./runs)")
        q.add_argument("--json", action="store_true", help="print JSON for scripts instead of a table")

    q = verbs.add_parser("list", help="a table of runs: id, strategy, status, epochs run/planned, best metric, checks",
                         description="One row per run folder under --runs-dir, oldest first. Status is finished, "
                                     "failed, interrupted or running.")
    common(q)
    q = verbs.add_parser("show", help="one run: the plan against what happened, transitions, checks, final metrics")
    q.add_argument("run", metavar="RUN", help=RUN_REF)
    common(q)
    q = verbs.add_parser("compare", help="runs side by side: final metrics and freeze timelines")
    q.add_argument("runs", nargs="+", metavar="RUN", help=f"two or more runs, each {RUN_REF}")
    common(q)
    return p


def _read_or_unreadable(path: Path) -> RunInfo:
    """One broken event log must not hide the other runs: it lists as ``unreadable`` with the reason."""
    try:
        return read_run(path)
    except MoolaError as exc:
        return RunInfo(id=path.name, path=path, status="unreadable", error=str(exc))


def run(args: argparse.Namespace) -> int:
    if args.runs_command == "list":
        infos = [_read_or_unreadable(path) for path in run_folders(args.runs_dir)]
        if args.json:
            print(json.dumps([{"id": r.id, "path": str(r.path), "strategy": r.strategy, "status": r.status,
                               "epochs_run": r.epochs_run, "epochs_planned": r.epochs_planned,
                               "best": {"metric": r.best_metric, "value": r.best_value, "epoch": r.best_epoch},
                               "checks": {"passed": r.checks_passed, "failed": r.checks_failed}, "error": r.error}
                              for r in infos], indent=2))
        elif not infos:
            print(f"no runs in {args.runs_dir}")
        else:
            print(table(LIST_HEADER, list_rows(infos)))
        return 0
    if args.runs_command == "show":
        info = read_run(resolve_run(args.run, args.runs_dir))
        print(json.dumps(info.to_json(), indent=2) if args.json else render_show(info))
        return 0
    if len(args.runs) < 2:
        raise MoolaError("runs compare: name at least two runs")
    infos = read_runs(args.runs, args.runs_dir)
    print(json.dumps(compare_json(infos), indent=2) if args.json else render_compare(infos))
    return 0
