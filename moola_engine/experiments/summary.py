"""From finished grid cells to the ablation's answer: per-arm statistics, paired comparisons, red flags.

Everything is read back from the run folders (predictions.npz, events.jsonl,
metrics.csv), never from the runner's memory, so a resumed or re-reported
grid gives the same numbers.  Metrics are computed from the saved outputs of
the test split (the validation split only when a run has no test split; it
also chose the best epoch, so those numbers are optimistic and the report
says so).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from moola_engine.checks.redflags import predictions_identical
from moola_engine.errors import MoolaError
from moola_engine.experiments import stats
from moola_engine.experiments.ablation import read_marker
from moola_engine.experiments.grid import Cell, Grid, cell_config
from moola_engine.logs import Event, read_events

METRICS = ("accuracy", "balanced_accuracy", "auc")
"""The metrics of a classification grid (the task ``classification`` and plugins' class tasks)."""
WIDE_INTERVAL = 0.10
"""A paired accuracy interval that holds zero and is wider than this (10 points) cannot tell "no effect" from a
large one.  (A wide interval that excludes zero still settles the direction.)"""
MIN_PAIRS = 6
"""With fewer non-zero pairs the two-sided Wilcoxon test cannot reach p < 0.05 (2 / 2**5 = 0.0625)."""
FLOAT_TOLERANCE = 1e-6
"""Accuracies are float32 means: an arm that always predicts the majority class lands ~1e-8 above its rate."""


# The field of ``weight_delta.check`` events (scope "interval") holding a group's distance from the pretrained weights.
PRETRAINED_DISTANCE_FIELD = "from_pretrained"


@attrs.define(kw_only=True)
class RunRecord:
    metrics: dict[str, float]
    cell: Cell
    run_dir: Path
    split: str
    majority: float
    outputs: np.ndarray
    y: np.ndarray
    history: list[dict[str, float]]
    groups: list[str]
    encoder_groups: list[str]
    trainable_by_epoch: list[list[str]]
    plan_trainable: dict[str, bool]
    transitions: list[dict[str, Any]]
    overrides: list[str]
    failed_checks: list[str]
    distances: dict[str, list[tuple[int, float]]]
    restored_before: list[dict[str, Any]] = attrs.Factory(list)
    """restore_best delivered weights from before these encoder transitions (``restore_best.before_transition``)."""


@attrs.frozen(kw_only=True)
class TaskView:
    """What the ablation reads from the grid's task: the metrics it reports and compares, and their direction."""

    task: Any
    metrics: tuple[str, ...]
    primary: str
    higher_is_better: bool
    classes: bool
    """Class-index targets: the majority-class rate is a reference (and the near-majority/single-class flags apply)."""

    def compute(self, outputs: np.ndarray, y: np.ndarray) -> dict[str, float]:
        import torch

        if self.classes:
            from moola_engine.core.metrics import classification_metrics

            m = classification_metrics(torch.as_tensor(outputs), torch.as_tensor(y).long())
        else:
            m = self.task.metrics(torch.as_tensor(outputs), self.task.targets(y, where="predictions.npz"))
            return {k: float(v) for k, v in m.items() if k != "loss"}
        return {k: float(m.get(k, math.nan)) for k in self.metrics}


def task_view(grid: Grid) -> TaskView:
    """The grid's task (``[task]`` of its config): classification keeps accuracy, balanced accuracy and AUC;
    any other task reports its ``primary`` metric first, then the other metrics its ``metrics()`` returns."""
    from moola_engine.core.tasks import build_task

    cfg = grid.cfg
    task = build_task(cfg.task, source=cfg.source, base_dir=cfg.base_dir)
    if task.classes:
        return TaskView(task=task, metrics=METRICS, primary="accuracy", higher_is_better=True, classes=True)
    return TaskView(task=task, metrics=(), primary=task.primary, higher_is_better=bool(task.higher_is_better),
                    classes=False)


def metric_names(view: TaskView, records: list[RunRecord]) -> tuple[str, ...]:
    """The metrics a grid reports: the task's primary first, then the others its ``metrics()`` returned."""
    if view.metrics:
        return view.metrics
    seen = sorted({k for r in records for k in r.metrics} - {view.primary})
    return (view.primary, *seen)


def _read_history(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    rows: list[dict[str, float]] = []
    with open(path, encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            rows.append({k: float(v) if v not in ("", None) else math.nan for k, v in row.items()})
    return rows


def read_run(grid: Grid, cell: Cell, marker: dict[str, Any], view: TaskView | None = None) -> RunRecord:
    view = view or task_view(grid)
    run_dir = grid.out / marker["run_dir"]
    with np.load(run_dir / "predictions.npz") as arrays:
        split = "test" if "test_outputs" in arrays.files else "val"
        outputs, y = arrays[f"{split}_outputs"], arrays[f"{split}_y"]
    events = read_events(run_dir / "events.jsonl")
    groups: list[str] = []
    head: set[str] = set()
    plan_trainable: dict[str, bool] = {}
    trainable_by_epoch: list[list[str]] = []
    transitions: list[dict[str, Any]] = []
    overrides: list[str] = []
    failed: list[str] = []
    distances: dict[str, list[tuple[int, float]]] = {}
    restored_before: list[dict[str, Any]] = []
    for e in events:
        name = e.get("event")
        if name == Event.GROUPS_RESOLVED:
            groups = [g["name"] for g in e.get("groups", [])]
            head = {g["name"] for g in e.get("groups", []) if g.get("head")}
        elif name == Event.PLAN_COMPUTED:
            plan = e.get("plan", {})
            head = head or set(plan.get("head_groups", []))
            groups = groups or list(plan.get("groups", []))
            for row in plan.get("epochs", []):
                for g, t in row.get("trainable", {}).items():
                    plan_trainable[g] = plan_trainable.get(g, False) or bool(t)
        elif name == Event.EPOCH_COMPLETED:
            trainable_by_epoch.append(list(e.get("trainable", [])))
        elif name == Event.FREEZE_TRANSITION:
            transitions.append({k: e.get(k) for k in ("epoch", "group", "from_state", "to_state", "lr", "reason")})
        elif name == Event.CONFIG_OVERRIDE:
            overrides.append(str(e.get("allow")))
        elif name == Event.RESTORE_BEST_BEFORE_TRANSITION:
            restored_before += [dict(t, best_epoch=e.get("best_epoch")) for t in e.get("transitions", [])]
        elif name in (Event.CHECK_FAILED, Event.WEIGHT_DELTA_VIOLATION):
            failed.append(str(e.get("message") or e.get("check") or name))
        elif name == Event.WEIGHT_DELTA_CHECK:
            value = e.get(PRETRAINED_DISTANCE_FIELD)
            if isinstance(value, (int, float)) and e.get("group") is not None and e.get("scope", "interval") == "interval":
                distances.setdefault(str(e["group"]), []).append((int(e.get("epoch", 0)), float(value)))
    return RunRecord(
        cell=cell, run_dir=run_dir, split=split, metrics=view.compute(outputs, y),
        majority=stats.majority_rate(y) if view.classes else math.nan,
        outputs=outputs, y=y, history=_read_history(run_dir / "metrics.csv"), groups=groups,
        encoder_groups=[g for g in groups if g not in head], trainable_by_epoch=trainable_by_epoch,
        plan_trainable=plan_trainable, transitions=transitions, overrides=overrides, failed_checks=failed,
        distances=distances, restored_before=restored_before,
    )


def collect(grid: Grid) -> tuple[list[RunRecord], list[Cell]]:
    """Records of the finished cells of ``grid`` and the cells not finished yet."""
    records, missing = [], []
    view = task_view(grid)
    for cell in grid.cells():
        marker = read_marker(grid, cell)
        if marker is None:
            missing.append(cell)
        else:
            records.append(read_run(grid, cell, marker, view))
    return records, missing


# --------------------------------------------------------------------------- red flags


def _flag(code: str, arm: str | None, message: str) -> dict[str, Any]:
    return {"code": code, "arm": arm, "message": message}


def encoder_trained(rec: RunRecord) -> bool | None:
    """Whether any encoder group was trainable in any epoch run (None: the log cannot tell)."""
    if not rec.encoder_groups:
        return None
    if rec.trainable_by_epoch:
        return any(g in epoch for epoch in rec.trainable_by_epoch for g in rec.encoder_groups)
    if rec.plan_trainable:
        return any(rec.plan_trainable.get(g, False) for g in rec.encoder_groups)
    return None


def _arm_flags(label: str, runs: list[RunRecord], control: bool, definition: dict[str, Any], *,
               classes: bool = True) -> tuple[
        list[dict[str, Any]], list[str]]:
    flags: list[dict[str, Any]] = []
    notes: list[str] = []
    trained = [encoder_trained(r) for r in runs]
    never = [r for r, t in zip(runs, trained) if t is False]
    if never:
        planned = any(r.plan_trainable.get(g, False) for r in never for g in r.encoder_groups)
        overridden = sorted({o for r in never for o in r.overrides})
        what = f"the encoder never trained in {len(never)} of {len(runs)} runs"
        if control:
            flags.append(_flag("encoder-never-trained", label, f"{what} of the control: it is no random-encoder "
                                                               "baseline of a fine-tuned model"))
        elif planned:
            flags.append(_flag("encoder-never-trained", label, f"{what}, although its plan trains it"))
        elif overridden:
            flags.append(_flag("encoder-never-trained", label,
                               f"{what}: the schedule check was overridden (--allow {', '.join(overridden)})"))
        elif definition.get("plugin") == "frozen":
            notes.append(f"{label}: the encoder never trains, by design (plugin 'frozen')")
        else:
            flags.append(_flag("encoder-never-trained", label, what))
    failed = [r for r in runs if r.failed_checks]
    if failed:
        flags.append(_flag("checks-failed", label, f"verification checks failed in {len(failed)} of {len(runs)} runs "
                                                   f"(first: {failed[0].failed_checks[0]}; {failed[0].run_dir})"))
    early = [r for r in runs if r.restored_before]
    if early:
        t = early[0].restored_before[0]
        flags.append(_flag("restored-before-transition", label,
                           f"restore_best delivered weights from before an encoder transition in {len(early)} of "
                           f"{len(runs)} runs (first: epoch {t.get('best_epoch')}, before {t.get('group')} at epoch "
                           f"{t.get('epoch')}; {early[0].run_dir}): those encoders were never fine-tuned"))
    single = [r for r in runs if classes and r.outputs.ndim == 2
              and len(np.unique(r.outputs.argmax(axis=1))) <= 1 and len(np.unique(r.y)) > 1]
    if single:
        flags.append(_flag("single-class", label, f"predicts one class for every sample in {len(single)} of "
                                                  f"{len(runs)} runs"))
    return flags, notes


def summarize(grid: Grid, *, records: list[RunRecord] | None = None, missing: list[Cell] | None = None,
              n_boot: int = stats.N_BOOT) -> dict[str, Any]:
    """The machine-readable answer (``results.json``): arms, comparisons, red flags, per-run metrics.

    A grid with a label-budget axis (``ablate --labels``) is summarized per budget (``budgets``); the top level
    holds the largest budget's tables, every run, and ``budget_curve``: each arm against the control per budget."""
    if records is None or missing is None:
        records, missing = collect(grid)
    view = task_view(grid)
    if not grid.budgets:
        return _summarize(grid, records, missing, view, n_boot=n_boot, budget=None)
    per = {n: _summarize(grid, [r for r in records if r.cell.labels == n], [c for c in missing if c.labels == n],
                         view, n_boot=n_boot, budget=n) for n in grid.labels}
    done = [n for n in grid.labels if per[n]["runs_finished"]]
    top_n = done[-1] if done else grid.labels[-1]
    top = dict(per[top_n])
    top["notes"] = [f"label-budget grid ({', '.join(str(n) for n in grid.labels)} labels): the tables are for the "
                    f"largest budget with finished runs ({top_n} labels); the label-budget curve compares every "
                    "budget", *top["notes"]]
    top.update(label_budget=top_n, labels=grid.labels, runs_finished=len(records), runs_total=len(grid.cells()),
               runs=[_run_row(r) for r in records],
               budgets={str(n): {k: v for k, v in per[n].items() if k != "runs"} for n in grid.labels},
               budget_curve=budget_curve(grid, per, view))
    return top


def budget_curve(grid: Grid, per: dict[Any, dict[str, Any]], view: TaskView) -> dict[str, Any]:
    """Every arm's primary metric per label budget, and its paired difference from the control, with intervals."""
    arms: dict[str, list[dict[str, Any]]] = {}
    for n in grid.labels:
        for arm in per[n]["arms"]:
            arms.setdefault(arm["label"], []).append({
                "labels": n, "n": arm["n"], "metric": (arm.get("metrics") or {}).get(view.primary),
                "vs_control": (arm.get("vs_control") or {}).get(view.primary)})
    refs: dict[str, list[dict[str, Any]]] = {}
    for n in grid.labels:
        for ref in (per[n].get("baselines") or {}).values():
            refs.setdefault(ref["label"], []).append({
                "labels": n, "n": ref["n"], "metric": (ref.get("metrics") or {}).get(view.primary),
                "vs_control": (ref.get("vs_control") or {}).get(view.primary)})
    return {"metric": view.primary, "higher_is_better": view.higher_is_better, "labels": grid.labels,
            "control": next(a.label for a in grid.arms if a.control), "arms": arms, "references": refs}


def _run_row(r: RunRecord) -> dict[str, Any]:
    return {"key": r.cell.key, "label": r.cell.label, "seed": r.cell.seed, "fold": r.cell.fold,
            "labels": r.cell.labels, "run_dir": str(r.run_dir), "split": r.split,
            "majority": None if math.isnan(r.majority) else r.majority,
            **{m: (None if math.isnan(v) else v) for m, v in r.metrics.items()}}


def _summarize(grid: Grid, records: list[RunRecord], missing: list[Cell], view: TaskView, *, n_boot: int,
               budget: int | None) -> dict[str, Any]:
    metrics = metric_names(view, records)
    primary = view.primary
    by_arm: dict[str, list[RunRecord]] = {a.label: [] for a in grid.arms}
    for r in records:
        by_arm[r.cell.label].append(r)
    control = next(a for a in grid.arms if a.control)
    ctrl = {r.cell.pair: r for r in by_arm[control.label]}
    splits = sorted({r.split for r in records})
    red: list[dict[str, Any]] = []
    notes: list[str] = list(grid.warnings)
    if grid.cfg.model.pretrained is None or not grid.cfg.model.pretrained.enabled:
        red.append(_flag("no-pretrained", None, "no pretrained encoder in the config: nothing was transferred, "
                                                "the control is not a control"))
    if "val" in splits:
        notes.append("some runs have no test split: their metrics are on the validation split, which also chose the "
                     "best epoch (optimistic)")
    cells_total = len([c for c in grid.cells() if c.labels == budget])
    if missing:
        notes.append(f"{len(missing)} of {cells_total} runs are not finished; statistics use the finished "
                     "ones (rerun the ablate command to complete the grid)")

    arms_out: list[dict[str, Any]] = []
    near_majority: list[bool | None] = []
    for arm in grid.arms:
        runs = by_arm[arm.label]
        entry: dict[str, Any] = {"label": arm.label, "strategy": arm.strategy, "control": arm.control,
                                 "definition": arm.definition, "n": len(runs)}
        if not runs:
            entry["metrics"] = {}
            arms_out.append(entry)
            continue
        entry["metrics"] = {m: stats.estimate([r.metrics.get(m, math.nan) for r in runs], n_boot=n_boot).to_json()
                            for m in metrics}
        if view.classes:
            over = stats.estimate([r.metrics["accuracy"] - r.majority for r in runs], n_boot=n_boot)
            entry["vs_majority"] = over.to_json()
            # an undefined interval (one run) says nothing either way: None, and it cannot raise near-majority
            within = None if not math.isfinite(over.lo) else not over.lo > FLOAT_TOLERANCE
            entry["within_noise_of_majority"] = within
            near_majority.append(within)
        flags, arm_notes = _arm_flags(arm.label, runs, arm.control, arm.definition, classes=view.classes)
        red += flags
        notes += arm_notes
        entry["encoder_trained_runs"] = sum(encoder_trained(r) is True for r in runs)
        if not arm.control:
            pairs = [(r, ctrl[r.cell.pair]) for r in runs if r.cell.pair in ctrl]
            entry["pairs"] = len(pairs)
            entry["vs_control"] = {
                m: stats.paired_difference([a.metrics.get(m, math.nan) for a, _ in pairs],
                                           [b.metrics.get(m, math.nan) for _, b in pairs],
                                           n_boot=n_boot).to_json() for m in metrics}
            same = sum(predictions_identical(a.outputs, b.outputs) for a, b in pairs)
            entry["identical_to_control"] = same
            if pairs and same == len(pairs):
                red.append(_flag("predictions-identical", arm.label,
                                 f"predictions identical to the control's in all {same} paired runs: the strategy "
                                 "changed nothing the test set can see"))
            acc = entry["vs_control"][primary]
            nonzero = sum(a.metrics[primary] != b.metrics[primary] for a, b in pairs)
            if len(pairs) and nonzero < MIN_PAIRS:
                red.append(_flag("too-few-pairs", arm.label,
                                 f"{nonzero} non-zero paired differences: the Wilcoxon test cannot reach p < 0.05 "
                                 f"with fewer than {MIN_PAIRS} (run more seeds or folds)"))
            if (view.classes and acc["lo"] is not None and acc["hi"] is not None and acc["lo"] <= 0.0 <= acc["hi"]
                    and acc["hi"] - acc["lo"] > WIDE_INTERVAL):
                red.append(_flag("interval-too-wide", arm.label,
                                 f"95% interval of the accuracy difference vs control is {acc['lo']:+.3f}..{acc['hi']:+.3f} "
                                 f"(wider than {WIDE_INTERVAL:.2f}): it cannot tell no effect from a large one"))
        arms_out.append(entry)
    baselines: dict[str, Any] = {}
    ref: dict[str, Any] | None = None
    for comp in _baselines():
        entry_b, ref_flags, ref_notes = reference_baseline(grid, ctrl, comp, n_boot=n_boot, budget=budget,
                                                           metrics=metrics, classes=view.classes)
        if entry_b is not None:
            baselines[comp.name] = entry_b
            ref = ref or entry_b
        red += ref_flags
        notes += ref_notes
    if near_majority and all(w is True for w in near_majority):
        msg = ("every arm's accuracy is within noise of the majority-class rate: no arm beat always predicting the "
               "most frequent class")
        ref_over: dict[str, Any] = (ref or {}).get("vs_majority") or {}
        if ref is not None and ref_over.get("lo") is not None and ref_over["lo"] > FLOAT_TOLERANCE:
            msg += (f"; the {ref['label']} baseline does (accuracy - majority {ref_over['mean']:+.3f}, 95% CI "
                    f"{ref_over['lo']:+.3f}..{ref_over['hi']:+.3f}), so the labels are learnable: suspect the networks")
        red.append(_flag("near-majority", None, msg))

    majority = [r.majority for r in records]
    out = {
        "config_file": grid.cfg.source,
        "out": str(grid.out),
        "seeds": grid.seeds,
        "folds": grid.folds,
        "eval_split": splits[0] if len(splits) == 1 else splits,
        "runs_finished": len(records),
        "runs_total": cells_total,
        "task": {"name": getattr(view.task, "name", grid.cfg.task.name), "primary": primary,
                 "higher_is_better": view.higher_is_better, "classes": view.classes, "metrics": list(metrics)},
        "majority_rate": stats.estimate(majority, n_boot=n_boot).to_json() if view.classes else None,
        "eval_size": int(np.mean([len(r.y) for r in records])) if records else 0,
        "arms": arms_out,
        "baselines": baselines,
        "red_flags": red,
        "notes": notes,
        "statistics": {"interval": "95% percentile bootstrap of the mean over runs", "n_boot": n_boot,
                       "paired_test": "two-sided Wilcoxon signed-rank over (seed, fold) pairs",
                       "mde": f"paired t, alpha {stats.ALPHA}, power {stats.POWER}, from the SD of the differences"},
        "runs": [_run_row(r) for r in records],
    }
    if budget is not None:
        out["label_budget"] = budget
    return out


# --------------------------------------------------------------------------- the non-network reference


def _baselines() -> list[Any]:
    """The installed reference baselines (plugins register them: the OHLC package's logistic regression)."""
    from moola_engine.core.components import default_registries

    return default_registries()["baseline"].items()


def reference_baseline(grid: Grid, ctrl: dict[Any, RunRecord], comp: Any, *,
                       n_boot: int = stats.N_BOOT, budget: int | None = None,
                       metrics: tuple[str, ...] = METRICS, classes: bool = True
                       ) -> tuple[dict[str, Any] | None, list[dict[str, Any]], list[str]]:
    """One registered baseline fitted for every (seed, fold) of ``grid``: entry, red flags, notes.

    Each cell's splits come from the control cell's own config (:func:`moola_engine.experiments.grid.cell_config`:
    same seed, ``data.folds`` and ``data.fold``), so the baseline is fitted on the labeled rows the networks of that
    cell trained on and scored on the split their saved outputs are scored on.  No training loop.  ``ctrl`` maps
    (seed, fold) to the control's finished run, for the paired comparison.  A baseline that cannot read this data
    (it returns None) gives a note saying so.
    """
    from moola_engine.core.data import DataRequest, build_splits
    from moola_engine.core.tasks import build_task

    label = comp.description or comp.name
    flags: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    mismatched: list[str] = []
    for cell in (c for c in grid.cells() if c.control and c.labels == budget):
        cfg = cell_config(grid, cell, threads=None)
        try:
            task = build_task(cfg.task, source=cfg.source, base_dir=cfg.base_dir)
            splits = build_splits(cfg.data, base_dir=cfg.base_dir, seed=cfg.train.seed, source=cfg.source, task=task)
            req = DataRequest(cfg=cfg.data, options=cfg.data.options, base_dir=cfg.base_dir, seed=cfg.train.seed,
                              source=cfg.source, task=task)
            res = comp.factory(splits, req)
        except MoolaError as exc:
            return None, [], [f"no {label} baseline: building the data of seed {cell.seed} fold "
                              f"{cell.fold} failed: {exc}"]
        if res is None:
            return None, [], [f"no {label} baseline: it cannot read data.kind = {grid.cfg.data.kind!r}"]
        split = "test" if "test" in res else "val"
        y = getattr(splits, split).y.cpu().numpy()
        run = {"seed": cell.seed, "fold": cell.fold, "labels": cell.labels, "split": split,
               "train_size": len(splits.train), "eval_size": len(y),
               "majority": stats.majority_rate(y) if classes else None,
               **{m: _num(res[split].get(m)) for m in metrics}}
        c = ctrl.get(cell.pair)
        if c is not None and (c.split != split or not np.array_equal(c.y, y)):
            mismatched.append(f"seed {cell.seed} fold {cell.fold}")
            run["paired"] = False
        else:
            run["paired"] = c is not None
        runs.append(run)
    if mismatched:
        flags.append(_flag("baseline-data-mismatch", None,
                           f"the {label} baseline's evaluation labels differ from the control run's in "
                           f"{len(mismatched)} cell(s) ({', '.join(mismatched[:3])}): the data changed since those "
                           "runs, so these cells are left out of the paired comparison"))

    def values(m: str, rows: list[dict[str, Any]]) -> list[float]:
        return [math.nan if r[m] is None else r[m] for r in rows]

    paired = [r for r in runs if r["paired"]]
    ctrl_rows = [ctrl[(r["seed"], r["fold"], r["labels"])] for r in paired]
    entry: dict[str, Any] = {
        "label": label, "reference": True, "baseline": comp.name, "source": comp.source, "n": len(runs),
        "pairs": len(paired), "eval_split": sorted({r["split"] for r in runs})[0] if runs else None,
        "metrics": {m: stats.estimate(values(m, runs), n_boot=n_boot).to_json() for m in metrics},
        "vs_majority": stats.estimate([r["accuracy"] - r["majority"] for r in runs if r.get("accuracy") is not None],
                                      n_boot=n_boot).to_json() if classes else None,
        "vs_control": {m: stats.paired_difference(values(m, paired), [c.metrics[m] for c in ctrl_rows],
                                                  n_boot=n_boot).to_json() for m in metrics},
        "runs": runs,
    }
    return entry, flags, []


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)
