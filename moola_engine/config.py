"""Config: frozen, keyword-only attrs classes structured by one cattrs converter.

Reading a file (:func:`read_toml`) is separate from structuring it
(:func:`structure`).  The converter forbids unknown keys, and every failure is
flattened by ``cattrs.transform_error`` into lines a user can act on::

    experiment.toml: 2 problems
      - invalid value, expected an integer, got str 'many' @ $.train.epochs
      - extra fields found (lr_mul) @ $.train

The ExceptionGroup stays attached as the ``__cause__``; the CLI never shows it.
"""

from __future__ import annotations

import difflib
import re
import sys
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import attrs
import cattrs

from moola_engine.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the project requires 3.11, tomli is the fallback named by the design
    import tomli as tomllib

T = TypeVar("T")

converter = cattrs.Converter(forbid_extra_keys=True)


# Numbers and booleans are taken as TOML typed them: "3" is not 3, true is not 1, 1.5 is not 1 (cattrs would
# coerce each silently).  An integer is accepted where a float is expected.  Errors name the key, as all others.
class StrictTypeError(ValueError):
    """A TOML value of the wrong type for a number or boolean field (the message says what was expected)."""


def _strict_int(value: Any, _: type) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise StrictTypeError(f"expected an integer, got {type(value).__name__} {value!r}")
    return value


def _strict_float(value: Any, _: type) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise StrictTypeError(f"expected a number, got {type(value).__name__} {value!r}")
    return float(value)


def _strict_bool(value: Any, _: type) -> bool:
    if not isinstance(value, bool):
        raise StrictTypeError(f"expected true or false, got {type(value).__name__} {value!r}")
    return value


converter.register_structure_hook(int, _strict_int)
converter.register_structure_hook(float, _strict_float)
converter.register_structure_hook(bool, _strict_bool)


class FieldValueError(ValueError):
    """Raised by field validators; carries the field name so the error path can name the key."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _positive(inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and value <= 0:
        raise FieldValueError(attr.name, f"expected a value > 0, got {value!r}")


def _non_negative(inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and value < 0:
        raise FieldValueError(attr.name, f"expected a value >= 0, got {value!r}")


def _fraction(inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if not 0.0 < value < 1.0:
        raise FieldValueError(attr.name, f"expected a value between 0 and 1 (exclusive), got {value!r}")


def _device(inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if not re.fullmatch(r"auto|mps|(cpu|cuda)(:\d+)?", value):
        raise FieldValueError(attr.name, f'expected "auto", "cpu", "cuda", "cuda:N" or "mps", got {value!r}')


positive = _positive
non_negative = _non_negative
fraction = _fraction


# --------------------------------------------------------------------------- sections


@attrs.frozen(kw_only=True)
class GroupSpec:
    """One named parameter group: module-name patterns, ordered input -> output in the list."""

    name: str
    modules: list[str]
    head: bool = False
    """Head groups train under every strategy (except ``bitfit``-style rules on biases)."""


@attrs.frozen(kw_only=True)
class RenameRule:
    """A regex rename applied to checkpoint keys (``re.sub(pattern, replace, key)``)."""

    pattern: str
    replace: str


@attrs.frozen(kw_only=True)
class PretrainedConfig:
    """``[model.pretrained]``: where the pretrained weights come from and how keys map."""

    path: str
    enabled: bool = True
    """``false`` is the random-encoder control: everything else stays equal."""
    strip_prefix: str = ""
    add_prefix: str = ""
    rename: list[RenameRule] = attrs.Factory(list)
    lstm_layers: list[int] | None = None
    """Keep only these LSTM layers of the source (renumbered from 0), e.g. ``[0]``."""
    groups: list[str] = attrs.Factory(list)
    """Groups whose every tensor must be loaded (default ``min_loaded``)."""
    min_loaded: int | None = None
    allow_fresh_init: bool = False
    """Accept a file whose tensors all look freshly initialised."""


@attrs.frozen(kw_only=True)
class ModelConfig:
    name: str = "simple_lstm"
    """A registered model name (``moola-engine components list``) or an import path ``"package.module:callable"``."""
    params: dict[str, Any] = attrs.Factory(dict)
    """Keyword arguments of the model factory."""
    groups: list[GroupSpec] = attrs.Factory(list)
    pretrained: PretrainedConfig | None = None


@attrs.frozen(kw_only=True)
class EarlyStoppingConfig:
    """``[train.early_stopping]``: stop when ``metric`` has not improved by ``min_delta`` for ``patience`` epochs."""

    patience: int = attrs.field(default=10, validator=_positive)
    min_delta: float = attrs.field(default=0.0, validator=_non_negative)
    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    """``min``: lower is better (a loss); ``max``: higher is better (accuracy)."""


@attrs.frozen(kw_only=True)
class TrainConfig:
    epochs: int = attrs.field(default=30, validator=_positive)
    batch_size: int = attrs.field(default=16, validator=_positive)
    lr: float = attrs.field(default=1e-3, validator=_positive)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    weight_decay: float = attrs.field(default=0.0, validator=_non_negative)
    momentum: float = attrs.field(default=0.9, validator=_non_negative)
    grad_clip: float | None = attrs.field(default=None, validator=_positive)
    grad_guard: Literal["epoch", "step"] = "epoch"
    """How a NaN/inf is caught (either way the run stops at the epoch's end, before its checkpoint):
    ``epoch`` checks every step's loss and, once per epoch, the trained weights (a non-finite gradient makes
    them non-finite), naming the first bad loss step and the tensors; ``step`` also takes every gradient's
    norm after every backward, naming the step and tensor where a gradient first went bad (one more
    multi-tensor reduction per step: about 3% of a small model's step on the CPU)."""
    seed: int = attrs.field(default=0, validator=_non_negative)
    device: str = attrs.field(default="auto", validator=_device)
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False
    threads: int | None = attrs.field(default=None, validator=_positive)
    early_stopping: EarlyStoppingConfig | None = None
    restore_best: bool = True
    train_bn: bool = False
    """Run BatchNorm of frozen groups in train mode (default: eval, statistics frozen too)."""
    frozen_dropout: bool = True
    """Keep dropout active inside frozen groups (``false``: eval mode there)."""
    # lr scheduler (moola_engine.core.schedulers): composes with the strategy's per-group lr scales
    scheduler: Literal["none", "onecycle", "plateau", "cosine"] = "none"
    scheduler_metric: str = "val_loss"
    """The metric ``scheduler = "plateau"`` watches."""
    scheduler_mode: Literal["min", "max"] = "min"
    plateau_factor: float = attrs.field(default=0.5, validator=_fraction)
    plateau_patience: int = attrs.field(default=2, validator=_non_negative)


@attrs.frozen(kw_only=True)
class ChecksConfig:
    strict: bool = True
    """A failed check stops the run with a non-zero exit (``false``: error event only)."""
    weight_delta: bool = True
    grad_flow: bool = True
    bn_stats: bool = True
    lr_mask: bool = True
    """Each epoch, every group's live optimizer lr and every parameter's ``requires_grad`` against the plan."""
    snapshots: Literal["exact", "fingerprint"] = "exact"
    every: int = attrs.field(default=1, validator=_positive)
    """Weight-delta and BatchNorm interval checks at every ``every``-th epoch end (transitions, phase ends and the
    fit's end are always checked, so an interval then spans up to ``every`` epochs): the lever for models whose
    epochs are a few steps long, where reading every weight each epoch is a visible share of the run."""


@attrs.frozen(kw_only=True)
class TaskConfig:
    """``[task]``: what the labels are, the loss and the metrics (``classification``, ``multi-label``,
    ``regression``, a plugin's task or an import path)."""

    name: str = "classification"
    params: dict[str, Any] = attrs.Factory(dict)


@attrs.frozen(kw_only=True)
class DataConfig:
    kind: str = "npz"
    """Which loader builds the dataset (a registered data kind or an import path); its own keys live in ``options``."""
    path: str | None = None
    test_path: str | None = None
    """A separate test file (``table``, ``npz``): the held-out split, never seen in training or model selection."""
    labels: int | None = attrs.field(default=None, validator=_positive)
    """Label budget: keep this many labeled training rows, drawn per seed (stratified for class labels)."""
    val_fraction: float = attrs.field(default=0.2, validator=_fraction)
    folds: int = attrs.field(default=1, validator=_positive)
    """Number of folds the loader can cut (repeated stratified for i.i.d. data, chronological for series)."""
    fold: int = attrs.field(default=0, validator=_non_negative)
    """Which fold this run uses (0 <= fold < folds); the ablation sets it per grid cell."""
    options: dict[str, Any] = attrs.Factory(dict)


@attrs.frozen(kw_only=True)
class CheckpointConfig:
    """``[checkpoint]``: resumable checkpoints in ``runs/<id>/checkpoints/`` (see docs/reliability.md)."""

    enabled: bool = True
    every: int = attrs.field(default=1, validator=_positive)
    """Save at the end of every ``every``-th epoch (and always around a freeze transition and at the last epoch)."""
    keep: int = attrs.field(default=3, validator=_positive)
    """Keep the newest ``keep`` checkpoints; older ones are deleted after a newer one is safely on disk."""


@attrs.frozen(kw_only=True)
class PretrainSection:
    """``[pretrain]``: the objective ``moola-engine pretrain`` runs on this experiment's ``[data]`` and ``[model]``."""

    objective: str | None = None
    """A registered objective (``moola-engine components list``) or an import path."""
    params: dict[str, Any] = attrs.Factory(dict)
    """The objective's parameters (its registered params class)."""


@attrs.frozen(kw_only=True)
class SinkConfig:
    """One ``[[sinks]]`` table: ``name`` of a registered sink; its other keys are that sink's options."""

    name: str
    options: dict[str, Any] = attrs.Factory(dict)


def _default_sinks() -> list[SinkConfig]:
    return [SinkConfig(name="csv")]


@attrs.frozen(kw_only=True)
class RunConfig:
    strategy: str | None = None
    strategies_file: str | None = None
    runs_dir: str = "runs"
    """Where run folders go, relative to the experiment file (like every path in it)."""
    name: str | None = None
    console: Literal["pretty", "json", "none"] = "pretty"
    allow: list[str] = attrs.Factory(list)
    """Explicit overrides of schedule validation (e.g. ``never-unfreeze``), recorded in the log."""


@attrs.frozen(kw_only=True)
class ExperimentConfig:
    run: RunConfig = attrs.Factory(RunConfig)
    train: TrainConfig = attrs.Factory(TrainConfig)
    model: ModelConfig = attrs.Factory(ModelConfig)
    task: TaskConfig = attrs.Factory(TaskConfig)
    data: DataConfig = attrs.Factory(DataConfig)
    checks: ChecksConfig = attrs.Factory(ChecksConfig)
    checkpoint: CheckpointConfig = attrs.Factory(CheckpointConfig)
    pretrain: PretrainSection = attrs.Factory(PretrainSection)
    sinks: list[SinkConfig] = attrs.Factory(_default_sinks)
    """Where metrics and events go besides events.jsonl; a ``[[sinks]]`` list replaces the default (csv)."""
    source: str = attrs.field(default="<defaults>", metadata={"toml": False})

    @property
    def base_dir(self) -> Path:
        """The experiment file's folder: every relative path in it resolves here (the cwd for built-in defaults)."""
        return Path(self.source).resolve().parent if self.source != "<defaults>" else Path.cwd()

    def resolve(self, path: str | Path) -> Path:
        """``path`` as written in this experiment file, made absolute against :attr:`base_dir`."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.base_dir / p


# --------------------------------------------------------------------------- reading


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file; a missing file or a syntax error is a :class:`ConfigError` naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), "no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise ConfigError(repr(str(path)) if "\x00" in str(path) else str(path), f"cannot read: {exc}") from exc
    return parse_toml(text, str(path))


def parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, f"invalid TOML: {exc}") from exc


def structure(data: Any, cls: type[T], *, source: str, path: str = "$") -> T:
    """Structure ``data`` into ``cls``; every failure becomes one line of a :class:`ConfigError`."""
    try:
        return converter.structure(data, cls)
    except (cattrs.BaseValidationError, ValueError, TypeError, KeyError, AttributeError) as exc:
        if isinstance(exc, cattrs.BaseValidationError):
            problems = cattrs.transform_error(exc, path=path, format_exception=_format_exception)
        else:
            problems = [f"{_format_exception(exc, cls)} @ {path}"]
        raise ConfigError(source, [_move_field(p) for p in problems]) from exc


_FIELD_MARK = "\x00"


def _format_exception(exc: BaseException, type_: Any) -> str:
    args = typing.get_args(type_)
    if type(None) in args and len(args) == 2:  # TOML has no null: `int | None` reads as `int` to a user
        type_ = next(a for a in args if a is not type(None))
    if isinstance(exc, StrictTypeError):
        return f"invalid value, {exc}"
    if isinstance(exc, FieldValueError):
        return f"invalid value, {exc}{_FIELD_MARK}{exc.field}"
    if isinstance(exc, (AttributeError, TypeError)) and (attrs.has(type_) or type_ in (dict, Mapping)):
        return "invalid value, expected a table"
    if typing.get_origin(type_) is Literal:
        choices = ", ".join(repr(c) for c in typing.get_args(type_))
        return f"invalid value, expected one of {choices}"
    return cattrs.v.format_exception(exc, type_)


def _move_field(problem: str) -> str:
    """``msg<mark>field @ $.x`` -> ``msg @ $.x.field``: validator errors name their key."""
    if _FIELD_MARK not in problem:
        return problem
    msg, rest = problem.split(_FIELD_MARK, 1)
    field, _, where = rest.partition(" @ ")
    return f"{msg} @ {where}.{field}"


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and structure an experiment config (``[run]``, ``[train]``, ``[model]``, ``[data]``, ``[checks]``)."""
    data = read_toml(path)
    cfg = structure(data, ExperimentConfig, source=str(path))
    return attrs.evolve(cfg, source=str(path))


def unstructure(obj: Any) -> Any:
    return converter.unstructure(obj)


def closest(name: str, choices: list[str] | Mapping[str, Any]) -> str | None:
    """The closest of ``choices`` to ``name``, or None when nothing is close."""
    found = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return found[0] if found else None


def _structure_sink(data: Any, cls: type) -> SinkConfig:
    """``{name = "...", <options>...}``: the sink's options sit beside its name, as a strategy's params do."""
    if not isinstance(data, Mapping):
        raise TypeError("expected a table")
    options = dict(data)
    name = options.pop("name", None)
    if not isinstance(name, str):
        raise FieldValueError("name", "expected a sink name (a string), e.g. name = \"csv\"")
    return SinkConfig(name=name, options=options)


converter.register_structure_hook(SinkConfig, _structure_sink)
converter.register_unstructure_hook(SinkConfig, lambda s: {"name": s.name, **s.options})


# ExperimentConfig.source is not a TOML key: keep it out of structuring.
converter.register_structure_hook(
    ExperimentConfig,
    cattrs.gen.make_dict_structure_fn(
        ExperimentConfig, converter, _cattrs_forbid_extra_keys=True, source=cattrs.gen.override(omit=True)
    ),
)

