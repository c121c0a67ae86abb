"""The ablation report: a console table, ``report.md``, a standalone ``report.html`` and ``results.json``.

Figures (learning curves, distance from the pretrained weights, freeze
timelines) need matplotlib, the optional extra ``report``
(``pip install 'moola-engine[report]'``); without it the HTML page has the
tables and says why the figures are missing.  Figures are PNGs embedded as
base64, so the page is one file that can be mailed or attached to a PR.
"""

from __future__ import annotations

import base64
import html
import io
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moola_engine import jsonsafe
from moola_engine.experiments.grid import Grid
from moola_engine.experiments.summary import METRICS, PRETRAINED_DISTANCE_FIELD, RunRecord
from moola_engine.runs.folders import write_json_atomic

LABELS = {"accuracy": "accuracy", "balanced_accuracy": "balanced acc.", "auc": "AUC"}


def label(metric: str) -> str:
    return LABELS.get(metric, metric)


def report_metrics(results: dict[str, Any]) -> list[str]:
    """The metrics of the grid's task (results of an older engine: the classification three)."""
    return list((results.get("task") or {}).get("metrics") or METRICS)


def direction(results: dict[str, Any], metric: str) -> str:
    task = results.get("task") or {}
    if task.get("classes", True) or metric != task.get("primary"):
        return ""
    return " (higher is better)" if task.get("higher_is_better") else " (lower is better)"


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _ci(e: dict[str, Any] | None, signed: bool = False) -> str:
    if not e or e.get("mean") is None:
        return "n/a"
    fmt = "+.3f" if signed else ".3f"
    if e.get("lo") is None:
        return f"{_f(e['mean'], fmt)} (n={e['n']})"
    return f"{_f(e['mean'], fmt)} ({_f(e['lo'], fmt)}..{_f(e['hi'], fmt)})"


def _p(p: float | None) -> str:
    return "n/a" if p is None else ("p<0.001" if p < 0.001 else f"p={p:.3f}")


def arm_name(arm: dict[str, Any]) -> str:
    return f"{arm['label']} ({arm['strategy']}, random encoder)" if arm["control"] else arm["label"]


def table_rows(results: dict[str, Any], metric: str = "accuracy") -> list[list[str]]:
    flags_by_arm: dict[str, list[str]] = {}
    for fl in results["red_flags"]:
        if fl["arm"]:
            flags_by_arm.setdefault(fl["arm"], []).append(fl["code"])
    rows = [["arm", "runs", f"{label(metric)} (95% CI)", "vs control (paired, 95% CI)", "Wilcoxon", "MDE",
             "red flags"]]
    for arm in results["arms"]:
        vs = (arm.get("vs_control") or {}).get(metric)
        rows.append([
            arm_name(arm), str(arm["n"]), _ci(arm["metrics"].get(metric)),
            "-" if arm["control"] else _ci(vs, signed=True),
            "-" if arm["control"] or not vs else _p(vs["p"]),
            "-" if arm["control"] or not vs else _f(vs["mde"]),
            ", ".join(flags_by_arm.get(arm["label"], [])) or "none",
        ])
    for ref in reference_rows(results):
        vs = (ref.get("vs_control") or {}).get(metric)
        rows.append([
            ref["label"], str(ref["n"]), _ci(ref["metrics"].get(metric)), _ci(vs, signed=True) if vs else "-",
            _p(vs["p"]) if vs else "-", _f(vs["mde"]) if vs else "-", REFERENCE_MARK,
        ])
    return rows


REFERENCE_MARK = "non-network reference"


def reference_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The computed baselines of ``results`` (non-network rows shown under the arms)."""
    return [b for b in (results.get("baselines") or {}).values() if b.get("metrics")]


def reference_note(results: dict[str, Any]) -> str | None:
    refs = reference_rows(results)
    if not refs:
        return None
    names = ", ".join(r["label"] for r in refs)
    return (f"{names}: a non-network reference, fitted without any training loop on the same labeled training "
            "windows of each seed and fold and scored on the same split; its 'vs control' is reference minus "
            "control over the same seeds and folds. A network that does not beat it has learned nothing the "
            "three range features do not already say.")


def text_table(results: dict[str, Any], metric: str = "accuracy") -> str:
    return text_rows(table_rows(results, metric))


def text_rows(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def md_table(rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out)


def curve_rows(results: dict[str, Any]) -> list[list[str]]:
    """The label-budget curve as a table: one row per arm, one column per budget (metric; paired vs control)."""
    curve = results.get("budget_curve")
    if not curve:
        return []
    budgets = curve["labels"]
    rows = [["arm", *[f"{n} labels" for n in budgets]]]
    series = [*curve["arms"].items(), *[(f"{k} ({REFERENCE_MARK})", v) for k, v in (curve.get("references") or {}).items()]]
    for arm, points in series:
        by_n = {p["labels"]: p for p in points}
        cells = []
        for n in budgets:
            p = by_n.get(n) or {}
            if arm == curve["control"]:
                cells.append(_ci(p.get("metric")))
            else:
                cells.append(f"{_ci(p.get('metric'))}; vs control {_ci(p.get('vs_control'), signed=True)} "
                             f"{_p((p.get('vs_control') or {}).get('p'))}")
        rows.append([arm, *cells])
    return rows


def curve_heading(results: dict[str, Any]) -> str:
    curve = results["budget_curve"]
    return (f"Label-budget curve: {label(curve['metric'])}{direction(results, curve['metric'])} per budget "
            f"(95% CI), and each arm minus the {curve['control']} arm over the same seeds and folds")


def console_summary(results: dict[str, Any]) -> str:
    maj = results.get("majority_rate")
    refs = [r["label"] for r in reference_rows(results)]
    task = results.get("task") or {}
    primary = task.get("primary", "accuracy")
    lines = [text_table(results, primary),
             *([f"({', '.join(refs)}: non-network reference, no training loop; same training "
                "windows and evaluation split as the networks of each seed and fold)"] if refs else []), "",
             (f"majority-class rate of the {results['eval_split']} set: {_ci(maj)}; " if maj else
              f"task {task.get('name')}: {label(primary)}{direction(results, primary)}; ")
             + f"{results['runs_finished']}/{results['runs_total']} runs"]
    if results.get("budget_curve"):
        lines += ["", curve_heading(results) + ":", text_rows(curve_rows(results))]
    for fl in results["red_flags"]:
        lines.append(f"RED FLAG [{fl['code']}] {fl['arm'] + ': ' if fl['arm'] else ''}{fl['message']}")
    for note in results["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- timelines


def _ranges(flags: Sequence[bool]) -> list[tuple[int, int, bool]]:
    out: list[tuple[int, int, bool]] = []
    for i, f in enumerate(flags):
        if out and out[-1][2] == f:
            out[-1] = (out[-1][0], i, f)
        else:
            out.append((i, i, f))
    return out


def timeline(rec: RunRecord) -> dict[str, list[bool]]:
    """Per group, trainable in each epoch run (from ``epoch.completed``; the plan when absent)."""
    if rec.trainable_by_epoch:
        return {g: [g in ep for ep in rec.trainable_by_epoch] for g in rec.groups}
    return {g: [rec.plan_trainable.get(g, False)] for g in rec.groups}


def timeline_text(rec: RunRecord) -> str:
    parts = []
    for g, flags in timeline(rec).items():
        spans = ", ".join(f"{a}-{b} {'trainable' if t else 'frozen'}" if a != b else f"{a} {'trainable' if t else 'frozen'}"
                          for a, b, t in _ranges(flags))
        parts.append(f"{g}: {spans}")
    return "; ".join(parts)


# --------------------------------------------------------------------------- figures


def _plt() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _by_arm(records: Sequence[RunRecord]) -> dict[str, list[RunRecord]]:
    out: dict[str, list[RunRecord]] = {}
    for r in records:
        out.setdefault(r.cell.label, []).append(r)
    return out


def _mean_curve(series: list[list[float]]) -> np.ndarray:
    n = max(len(s) for s in series)
    arr = np.full((len(series), n), np.nan)
    for i, s in enumerate(series):
        arr[i, : len(s)] = s
    with warnings.catch_warnings():  # an epoch no run reached is NaN, not a warning
        warnings.simplefilter("ignore", category=RuntimeWarning)
        mean: np.ndarray = np.nanmean(arr, axis=0)
    return mean


def figures(records: Sequence[RunRecord], results: dict[str, Any] | None = None) -> tuple[dict[str, str], list[str]]:
    """Base64 PNGs by name, and notes on what could not be drawn."""
    plt = _plt()
    if plt is None:
        return {}, ["figures unavailable: matplotlib is not installed (pip install 'moola-engine[report]')"]
    arms = _by_arm(records)
    figs: dict[str, str] = {}
    notes: list[str] = []
    colors = {label: f"C{i}" for i, label in enumerate(arms)}

    # learning curves: mean over runs (thick) and each run (thin)
    primary = ((results or {}).get("task") or {}).get("primary", "accuracy")
    keys = [k for k in ("train_loss", "val_loss", f"val_{primary}") if any(k in (r.history[0] if r.history else {})
                                                                          for r in records)]
    if keys:
        fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
        for ax, key in zip(axes[0], keys):
            for label, runs in arms.items():
                curves = [[row.get(key, math.nan) for row in r.history] for r in runs if r.history]
                if not curves:
                    continue
                for c in curves:
                    ax.plot(c, color=colors[label], alpha=0.12, linewidth=0.8)
                ax.plot(_mean_curve(curves), color=colors[label], linewidth=2, label=label)
            ax.set_title(key)
            ax.set_xlabel("epoch")
        axes[0][0].legend(fontsize=8)
        figs["learning_curves"] = _png(fig)

    # distance from the pretrained weights per group
    with_dist = {label: runs for label, runs in arms.items() if any(r.distances for r in runs)}
    if with_dist:
        fig, axes = plt.subplots(1, len(with_dist), figsize=(4.2 * len(with_dist), 3.2), squeeze=False)
        for ax, (label, runs) in zip(axes[0], with_dist.items()):
            groups = sorted({g for r in runs for g in r.distances})
            for gi, g in enumerate(groups):
                pts: dict[int, list[float]] = {}
                for r in runs:
                    for ep, d in r.distances.get(g, []):
                        pts.setdefault(ep, []).append(d)
                eps = sorted(pts)
                ax.plot(eps, [float(np.mean(pts[e])) for e in eps], color=f"C{gi}", label=g)
            ax.set_title(label)
            ax.set_xlabel("epoch")
            ax.set_ylabel("distance from pretrained")
            ax.legend(fontsize=7)
        figs["pretrained_distance"] = _png(fig)
    else:
        notes.append("distance from the pretrained weights unavailable: no weight_delta.check event carried "
                     f"{PRETRAINED_DISTANCE_FIELD} (no pretrained weights were loaded, or the checks were off)")

    # freeze timeline of each arm (its first run)
    firsts = {label: runs[0] for label, runs in arms.items() if runs}
    if firsts:
        fig, axes = plt.subplots(len(firsts), 1, figsize=(8, 0.9 + 0.45 * sum(len(r.groups) for r in firsts.values())),
                                 squeeze=False)
        for ax, (label, rec) in zip(axes[:, 0], firsts.items()):
            tl = timeline(rec)
            for gi, flags in enumerate(tl.values()):
                spans = [(a, b - a + 1) for a, b, t in _ranges(flags) if t]
                ax.broken_barh(spans, (gi - 0.35, 0.7), color="C2")
                frozen = [(a, b - a + 1) for a, b, t in _ranges(flags) if not t]
                ax.broken_barh(frozen, (gi - 0.35, 0.7), color="0.85")
            ax.set_yticks(range(len(tl)), list(tl))
            ax.set_title(f"{label}: trainable (green) / frozen (grey) by epoch", fontsize=9)
            ax.set_xlim(0, max(len(f) for f in tl.values()) if tl else 1)
        axes[-1, 0].set_xlabel("epoch")
        fig.tight_layout()
        figs["freeze_timeline"] = _png(fig)
    if results and results.get("budget_curve"):
        figs["budget_curve"] = budget_figure(plt, results)
    return figs, notes


def _budget_band(ax: Any, points: list[dict[str, Any]], key: str, *, color: str, label: str) -> None:
    """``points``' ``key`` mean per label budget, with its 95% CI band where every plotted point has one."""
    pts = [p for p in points if p.get(key) and p[key].get("mean") is not None]
    xs = [p["labels"] for p in pts]
    ax.plot(xs, [p[key]["mean"] for p in pts], marker="o", color=color, label=label)
    lo = [p[key]["lo"] for p in pts]
    if xs and all(v is not None for v in lo):
        ax.fill_between(xs, lo, [p[key]["hi"] for p in pts], color=color, alpha=0.15)


def budget_figure(plt: Any, results: dict[str, Any]) -> str:
    """Left: each arm's metric per label budget (95% CI bands); right: each arm minus the control (paired CI)."""
    curve = results["budget_curve"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (arm, points) in enumerate(curve["arms"].items()):
        _budget_band(ax1, points, "metric", color=f"C{i}", label=arm)
        if arm != curve["control"]:
            _budget_band(ax2, points, "vs_control", color=f"C{i}", label=arm)
    for ref, points in (curve.get("references") or {}).items():
        pts = [p for p in points if p.get("metric") and p["metric"].get("mean") is not None]
        ax1.plot([p["labels"] for p in pts], [p["metric"]["mean"] for p in pts], color="0.3", linestyle="--",
                 marker="x", label=f"{ref} (reference)")
    ax2.axhline(0.0, color="0.4", linewidth=0.8)
    name = label(curve["metric"]) + direction(results, curve["metric"])
    for ax, title in ((ax1, name), (ax2, f"{label(curve['metric'])}: arm minus {curve['control']} (paired)")):
        ax.set_xscale("log")
        ax.minorticks_off()  # the budgets are the ticks
        ax.set_xticks(curve["labels"], [str(n) for n in curve["labels"]])
        ax.set_xlabel("labeled training rows")
        ax.set_title(title, fontsize=9)
    ax1.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


# --------------------------------------------------------------------------- documents


FIGURE_TITLES = {
    "learning_curves": "Learning curves (mean over runs; thin lines: single runs)",
    "pretrained_distance": "Distance of each group from the pretrained weights",
    "freeze_timeline": "Freeze timeline of each arm (first run)",
    "budget_curve": "Label-budget curve: every arm, and every arm against the control, per budget (95% CI)",
}


def _reference_line(results: dict[str, Any]) -> str:
    maj = results.get("majority_rate")
    if maj:
        return f"Majority-class rate of the {results['eval_split']} set: {_ci(maj)}."
    task = results.get("task") or {}
    return (f"Task {task.get('name')}: compared by {label(task.get('primary', ''))}"
            f"{direction(results, task.get('primary', ''))}; no majority-class reference (not a class task).")


def markdown(results: dict[str, Any], timelines: dict[str, str], figure_notes: Sequence[str], command: str) -> str:
    out = [
        "# Ablation report", "",
        f"Command: `{command}`  ", f"Config: `{results['config_file']}`; seeds {results['seeds']}, "
        f"{results['folds']} fold(s); {results['runs_finished']}/{results['runs_total']} runs finished; "
        f"metrics on the {results['eval_split']} split (mean size {results['eval_size']}).", "",
        _reference_line(results), "",
    ]
    if results.get("budget_curve"):
        out += [f"## {curve_heading(results)}", "", md_table(curve_rows(results)), "",
                f"Tables below: the largest budget ({results['label_budget']} labels).", ""]
    for metric in report_metrics(results):
        out += [f"## {label(metric)}{direction(results, metric)}", "", md_table(table_rows(results, metric)), ""]
    out += ["Intervals: 95% percentile bootstrap over runs. vs control: mean of paired differences (same seed and "
            "fold) with its bootstrap interval; Wilcoxon: two-sided signed-rank p; MDE: the smallest true difference "
            "this design detects with 80% power at alpha 0.05 (a null result cannot rule out smaller effects).", ""]
    if reference_note(results):
        out += [str(reference_note(results)), ""]
    out += ["## Red flags", ""]
    out += [f"- **{fl['code']}**{' (' + fl['arm'] + ')' if fl['arm'] else ''}: {fl['message']}"
            for fl in results["red_flags"]] or ["none"]
    other = {n: b for n, b in (results.get("budgets") or {}).items() if str(n) != str(results.get("label_budget"))}
    if other:
        out += ["", "## Red flags at the other label budgets", ""]
        out += [f"- {n} labels: **{fl['code']}**{' (' + fl['arm'] + ')' if fl['arm'] else ''}: {fl['message']}"
                for n, b in other.items() for fl in b.get("red_flags", [])] or ["none"]
    out += ["", "## Notes", ""]
    out += [f"- {n}" for n in [*results["notes"], *figure_notes]] or ["none"]
    out += ["", "## Freeze timelines (first run of each arm)", ""]
    out += [f"- {label}: {text}" for label, text in timelines.items()]
    out += ["", "Figures: see report.html (same folder).", ""]
    return "\n".join(out)


def html_page(results: dict[str, Any], timelines: dict[str, str], figs: dict[str, str], figure_notes: Sequence[str],
              command: str) -> str:
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>moola-engine ablation report</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;"
        "text-align:left;font-variant-numeric:tabular-nums}th{background:#f3f3f3}.flag{color:#b00020}"
        "code{background:#f5f5f5;padding:0 .2em}.ref{font-style:italic;background:#f7f7fb}img{max-width:100%}"
        "</style></head><body>",
        "<h1>Ablation report</h1>",
        f"<p>Command: <code>{e(command)}</code><br>Config: <code>{e(results['config_file'])}</code>; seeds "
        f"{e(str(results['seeds']))}, {results['folds']} fold(s); {results['runs_finished']}/{results['runs_total']} "
        f"runs finished; metrics on the {e(str(results['eval_split']))} split (mean size {results['eval_size']}).</p>",
        f"<p>{e(_reference_line(results))}</p>",
    ]
    if results.get("budget_curve"):
        rows = curve_rows(results)
        parts.append(f"<h2>{e(curve_heading(results))}</h2><table><tr>" + "".join(f"<th>{e(c)}</th>" for c in rows[0])
                     + "</tr>" + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
                     + "</table>")
    for metric in report_metrics(results):
        rows = table_rows(results, metric)
        parts.append(f"<h2>{e(label(metric) + direction(results, metric))}</h2><table><tr>"
                     + "".join(f"<th>{e(c)}</th>" for c in rows[0]) + "</tr>")
        refs = {b["label"] for b in reference_rows(results)}
        parts += [("<tr class='ref'>" if r[0] in refs else "<tr>") + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>"
                  for r in rows[1:]]
        parts.append("</table>")
    if reference_note(results):
        parts.append(f"<p class='ref'>{e(str(reference_note(results)))}</p>")
    parts.append("<h2>Red flags</h2><ul>")
    parts += [f"<li class='flag'><b>{e(fl['code'])}</b>{' (' + e(fl['arm']) + ')' if fl['arm'] else ''}: "
              f"{e(fl['message'])}</li>" for fl in results["red_flags"]] or ["<li>none</li>"]
    other = {n: b for n, b in (results.get("budgets") or {}).items() if str(n) != str(results.get("label_budget"))}
    if other:
        parts.append("</ul><h2>Red flags at the other label budgets</h2><ul>")
        parts += [f"<li class='flag'>{e(str(n))} labels: <b>{e(fl['code'])}</b>"
                  f"{' (' + e(fl['arm']) + ')' if fl['arm'] else ''}: {e(fl['message'])}</li>"
                  for n, b in other.items() for fl in b.get("red_flags", [])] or ["<li>none</li>"]
    parts.append("</ul><h2>Notes</h2><ul>")
    parts += [f"<li>{e(n)}</li>" for n in [*results["notes"], *figure_notes]] or ["<li>none</li>"]
    parts.append("</ul>")
    for name, title in FIGURE_TITLES.items():
        if name in figs:
            parts.append(f"<h2>{e(title)}</h2><img alt='{e(name)}' src='data:image/png;base64,{figs[name]}'>")
    parts.append("<h2>Freeze timelines (first run of each arm)</h2><ul>")
    parts += [f"<li><b>{e(label)}</b>: {e(text)}</li>" for label, text in timelines.items()]
    parts.append("</ul></body></html>")
    return "\n".join(parts)


def write_report(grid: Grid, results: dict[str, Any], records: Sequence[RunRecord], *, command: str,
                 with_figures: bool = True) -> dict[str, Path]:
    """Write results.json, report.md and report.html into the grid's folder; returns their paths."""
    firsts: dict[str, RunRecord] = {}
    for r in records:
        firsts.setdefault(r.cell.label, r)
    order = [a.label for a in grid.arms if a.label in firsts]
    timelines = {label: timeline_text(firsts[label]) for label in order}
    figs, fig_notes = figures(records, results) if with_figures and records else ({}, [])
    paths = {"results": grid.out / "results.json", "markdown": grid.out / "report.md", "html": grid.out / "report.html"}
    write_json_atomic(paths["results"], {**results, "command": command, "freeze_timelines": timelines})
    for key, text in (("markdown", markdown(results, timelines, fig_notes, command)),
                      ("html", html_page(results, timelines, figs, fig_notes, command))):
        tmp = paths[key].with_name(f".{paths[key].name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(paths[key])
    return paths


def load_results(path: str | Path) -> dict[str, Any]:
    results: dict[str, Any] = jsonsafe.loads(Path(path).read_text(encoding="utf-8"))  # results.json: an object
    return results

