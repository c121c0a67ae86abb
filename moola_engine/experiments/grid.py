"""The ablation grid: arms (a strategy, or the random-encoder control) x seeds x folds x label budgets.

One *arm* is a row of the final table: a named strategy with the config's pretrained encoder, or the control
(the same config with ``model.pretrained.enabled = false`` and the control strategy, default ``immediate``).
One *cell* is one run: arm x seed x fold (x label budget).  :func:`build_grid` resolves every arm through the
one pre-flight, so a typo fails in a second; :func:`fingerprint` is what the manifest checks on resume.
Presets are registered by plugins (``register_presets``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from moola_engine.config import ExperimentConfig, load_config, unstructure
from moola_engine.errors import ConfigError
from moola_engine.runs.folders import safe_name
from moola_engine.safeio import sha256

CONTROL = "control"
GRID_VERSION = 1

@attrs.frozen(kw_only=True)
class Preset:
    """A named ablation a plugin registers (``register_presets``): ``ablate --preset NAME``, ``demo``."""

    name: str
    config: Path
    strategies: list[str]
    control: str = "immediate"
    seeds: int = 5
    folds: int | None = None
    """None: the config's ``data.folds``."""
    demo_seeds: int | None = None
    """Seeds ``moola-engine demo`` runs (default: :attr:`seeds`)."""
    description: str = ""


def preset_names() -> list[str]:
    """Every installed preset (plugins register them, as the OHLC package registers ``seed``)."""
    from moola_engine.core.components import default_registries

    return default_registries()["preset"].names()


def get_preset(name: str) -> Preset:
    """The preset registered as ``name``; an unknown one lists the installed presets."""
    from moola_engine.core.components import default_registries
    from moola_engine.core.registry import resolve

    comp = resolve(default_registries()["preset"], name, source="--preset", key="--preset")
    preset = comp.factory()
    if not isinstance(preset, Preset):
        raise ConfigError("--preset", f"preset {name!r} ({comp.source}) built a {type(preset).__name__}, not a Preset")
    return preset


# --------------------------------------------------------------------------- the grid


@attrs.frozen(kw_only=True)
class Arm:
    label: str
    strategy: str
    control: bool
    definition: dict[str, Any]
    """plugin + params as structured from strategies.toml (a changed definition invalidates old runs)."""
    work: int = 0
    """Encoder parameters trained, summed over the planned epochs (the plan's dry run): a run's rough relative
    cost, used only to start a seed's costly runs first (see :func:`run_order`).  A group counts whole even
    when a ``freeze_params`` mask trains only part of it."""


@attrs.frozen(kw_only=True)
class Cell:
    label: str
    strategy: str
    control: bool
    seed: int
    fold: int
    labels: int | None = None
    """The label budget of this cell (``data.labels``; ``ablate --labels``), None: the config's."""

    @property
    def key(self) -> str:
        return f"{self.label}__s{self.seed}__f{self.fold}" + (f"__n{self.labels}" if self.labels is not None else "")

    @property
    def run_name(self) -> str:
        return f"{self.label}-f{self.fold}" + (f"-n{self.labels}" if self.labels is not None else "")

    @property
    def pair(self) -> tuple[int, int, int | None]:
        """What a paired comparison matches on: the same seed, fold and label budget."""
        return (self.seed, self.fold, self.labels)


@attrs.frozen(kw_only=True)
class Grid:
    cfg: ExperimentConfig
    arms: list[Arm]
    seeds: list[int]
    folds: int
    out: Path
    strategies_file: Path
    warnings: list[str] = attrs.Factory(list)
    labels: list[int | None] = attrs.Factory(lambda: [None])
    """The label-budget axis (``ablate --labels 10,25,50``): every arm x seed x fold runs at each budget."""
    pinned: dict[str, Any] = attrs.Factory(dict)
    """``[train]`` values from the command line (``ablate --epochs``): they win over an arm's own values."""

    def cells(self) -> list[Cell]:
        """Seed-major order (the order of the manifest and the report); :func:`run_order` is the order runs
        start in.  Either way a partly finished grid has whole seeds done, so its results already pair."""
        return [Cell(label=a.label, strategy=a.strategy, control=a.control, seed=s, fold=f, labels=n)
                for s in self.seeds for n in self.labels for f in range(self.folds) for a in self.arms]

    @property
    def budgets(self) -> bool:
        """Whether this grid has a label-budget axis."""
        return self.labels != [None]

    @property
    def cells_dir(self) -> Path:
        return self.out / "cells"

    @property
    def runs_dir(self) -> Path:
        return self.out / "runs"

    def marker(self, cell: Cell) -> Path:
        return self.cells_dir / f"{safe_name(cell.key, max_len=96)}.json"  # a strategy name is not a safe file name

    def arm(self, label: str) -> Arm:
        return next(a for a in self.arms if a.label == label)


def default_out(cfg: ExperimentConfig, name: str) -> Path:
    """``<run.runs_dir>/ablate-<name>``: stable, so rerunning the same command resumes."""
    return cfg.resolve(cfg.run.runs_dir) / f"ablate-{name}"


def control_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The same experiment with a random encoder: ``model.pretrained.enabled = false``."""
    if cfg.model.pretrained is None:
        return cfg
    return attrs.evolve(cfg, model=attrs.evolve(cfg.model, pretrained=attrs.evolve(cfg.model.pretrained, enabled=False)))


def cell_config(grid: Grid, cell: Cell, threads: int | None) -> ExperimentConfig:
    """One cell's run config.  Checkpoints only at transitions and the last epoch (``every = epochs``): the grid
    reruns an interrupted cell from its start, so per-epoch checkpoints would be written and never read (on the
    fine-tuning-size task they cost about 15% of a run); the last one keeps each cell's final weights."""
    cfg = control_config(grid.cfg) if cell.control else grid.cfg
    epochs = int(grid.pinned.get("epochs") or max(cfg.train.epochs,
                                                  grid.arm(cell.label).definition.get("train", {}).get("epochs") or 0))
    return attrs.evolve(
        cfg,
        checkpoint=attrs.evolve(cfg.checkpoint, every=max(cfg.checkpoint.every, epochs)),
        run=attrs.evolve(cfg.run, runs_dir=str(grid.runs_dir), name=cell.run_name, console="none", strategy=None),
        train=attrs.evolve(cfg.train, seed=cell.seed, threads=threads if threads is not None else cfg.train.threads),
        data=attrs.evolve(cfg.data, folds=grid.folds, fold=cell.fold,
                          labels=cell.labels if cell.labels is not None else cfg.data.labels),
    )


def build_grid(
    cfg: ExperimentConfig,
    *,
    strategies: Sequence[str],
    control: str = "immediate",
    seeds: int | Sequence[int] = 5,
    folds: int | None = None,
    out: Path,
    strategies_file: str | None = None,
    labels: Sequence[int] | None = None,
    pinned: dict[str, Any] | None = None,
) -> Grid:
    """Resolve every strategy and dry-run its plan now, so a typo fails in a second, not after an hour."""
    from moola_engine.core.preflight import preflight
    from moola_engine.runs.train import resolve_strategy, strategies_path

    if not strategies:
        raise ConfigError("--strategies", "no strategy selected")
    if len(set(strategies)) != len(strategies):
        raise ConfigError("--strategies", f"a strategy is listed twice: {', '.join(strategies)}")
    if CONTROL in strategies:
        raise ConfigError("--strategies", f"{CONTROL!r} is the random-encoder control, added to every grid; "
                                          "do not list it")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list:
        raise ConfigError("--seeds", "expected at least one seed")
    budgets: list[int | None] = [None]
    if labels:
        if any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in labels):
            raise ConfigError("--labels", f"expected positive whole numbers, got {list(labels)}")
        if len(set(labels)) != len(labels):
            raise ConfigError("--labels", f"a budget is listed twice: {list(labels)}")
        budgets = [*sorted(labels)]
    n_folds = folds if folds is not None else cfg.data.folds
    if n_folds < 1:
        raise ConfigError("--folds", f"expected a value >= 1, got {n_folds}")
    warnings: list[str] = []
    if cfg.model.pretrained is None:
        warnings.append(
            f"{cfg.source} has no [model.pretrained] table: every arm starts from a random encoder, so the "
            "'control' arm is not a random-encoder control of anything and this grid cannot show transfer. "
            "Add [model.pretrained] path = ... to compare against pretrained weights.")
    elif not cfg.model.pretrained.enabled:
        warnings.append(
            f"{cfg.source}: model.pretrained.enabled = false: every arm uses a random encoder, so this grid "
            "compares strategies only; it cannot show transfer.")
    if n_folds == 1 and len(seed_list) < 6:
        warnings.append(f"{len(seed_list)} seed(s) x 1 fold = {len(seed_list)} pairs per comparison: the Wilcoxon "
                        "test cannot reach p < 0.05 with fewer than 6 pairs")

    sfile = strategies_path(cfg, strategies_file).resolve()
    model = None  # built once by the first arm's pre-flight, reused by the others
    arms: list[Arm] = []
    for label, name, is_control in [(CONTROL, control, True), *[(s, s, False) for s in strategies]]:
        try:
            pm, named = resolve_strategy(cfg, name, str(sfile))
        except ConfigError as exc:  # name the flag of this command, not train's --strategy
            if exc.source != "--strategy":
                raise
            raise ConfigError("--control" if is_control else "--strategies", exc.problems) from None
        arm_cfg = named.configure(cfg)  # [strategy.NAME.train]: its own values, then the flags
        arm_cfg = attrs.evolve(arm_cfg, train=attrs.evolve(arm_cfg.train, **(pinned or {})))
        pre = preflight(arm_cfg, pm=pm, named=named, model=model)  # the same pre-flight as train and plan
        model, plan = pre.model, pre.plan
        head = {g.name for g in pre.groups if g.head}
        numel = {g.name: g.numel() for g in pre.groups}
        work = sum(numel[g] for e in plan.epochs for g, on in e.trainable.items() if on and g not in head)
        arms.append(Arm(label=label, strategy=named.name, control=is_control,
                        definition={"plugin": named.plugin, "params": unstructure(named.params),
                                    **({"train": unstructure(named.train)} if named.train else {})}, work=work))
    return Grid(cfg=cfg, arms=arms, seeds=seed_list, folds=n_folds, out=out.resolve(), strategies_file=sfile,
                warnings=warnings, labels=budgets, pinned=dict(pinned or {}))


# --------------------------------------------------------------------------- manifest and markers


def fingerprint(grid: Grid) -> dict[str, Any]:
    """What makes two runs of a cell interchangeable: the experiment, not where or how it ran."""
    cfg = unstructure(grid.cfg)
    cfg.pop("run", None)
    cfg.pop("source", None)
    cfg["data"].pop("fold", None)
    cfg["data"]["folds"] = grid.folds
    cfg["train"].pop("threads", None)
    if grid.budgets:  # each cell sets its own data.labels; budgets may be added later, like seeds
        cfg["data"].pop("labels", None)
    pretrained = None
    if grid.cfg.model.pretrained is not None:
        p = Path(grid.cfg.model.pretrained.path)
        if not p.is_absolute():
            p = Path(grid.cfg.source).parent / p
        pretrained = sha256(p) if p.is_file() else None
    return {"experiment": cfg, "pretrained_sha256": pretrained,
            "arms": {a.label: {"strategy": a.strategy, **a.definition} for a in grid.arms},
            **({"pinned": grid.pinned} if grid.pinned else {})}


def _diff(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new)):
            if k in old and k in new:
                out += _diff(old[k], new[k], f"{path}.{k}" if path else str(k))
            elif path == "arms":
                continue  # arms may be added or dropped between invocations (a changed arm may not)
            else:
                out.append(f"{path}.{k}" if path else str(k))
        return out
    return [] if old == new else [path]


def marker_record(cell: Cell, run_dir: Path, out: Path, seconds: float, *, adopted: bool = False) -> dict[str, Any]:
    """A cell's done marker: which run folder holds it (relative to the grid folder) and how long it took."""
    return {"key": cell.key, "label": cell.label, "strategy": cell.strategy, "control": cell.control,
            "seed": cell.seed, "fold": cell.fold, "labels": cell.labels,
            "run_dir": os.path.relpath(run_dir, out), "seconds": round(seconds, 3), "adopted": adopted,
            "pid": os.getpid()}


def load_grid_config(config: str | None, preset: Preset | None) -> ExperimentConfig:
    path = config or (str(preset.config) if preset else None)
    if path is None:
        raise ConfigError("--config", "pass --config FILE or --preset NAME")
    if preset is not None and config is None and not Path(path).is_file():
        raise ConfigError(f"--preset {preset.name}", f"its config {path} does not exist (pass --config FILE)")
    return load_config(path)
