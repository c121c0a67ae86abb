"""Config: frozen, keyword-only attrs classes structured by one cattrs converter.

Reading a file (:func:`read_toml`) is separate from structuring it
(:func:`structure`).  The converter forbids unknown keys, and every failure is
flattened by ``cattrs.transform_error`` into lines a user can act on::

    experiment.toml: 2 problems
      - invalid value for type, expected int @ $.train.epochs
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

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the project requires 3.11, tomli is the fallback named by the design
    import tomli as tomllib

T = TypeVar("T")

converter = cattrs.Converter(forbid_extra_keys=True)


class FieldValueError(ValueError):
    """Raised by field validators; carries the field name so the error path can name the key."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _positive(inst: Any, attr: attrs.Attribute, value: Any) -> None:
    if value is not None and value <= 0:
        raise FieldValueError(attr.name, f"expected a value > 0, got {value!r}")


def _non_negative(inst: Any, attr: attrs.Attribute, value: Any) -> None:
    if value is not None and value < 0:
        raise FieldValueError(attr.name, f"expected a value >= 0, got {value!r}")


def _fraction(inst: Any, attr: attrs.Attribute, value: Any) -> None:
    if not 0.0 < value < 1.0:
        raise FieldValueError(attr.name, f"expected a value between 0 and 1 (exclusive), got {value!r}")


def _device(inst: Any, attr: attrs.Attribute, value: Any) -> None:
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
    params: dict[str, Any] = attrs.Factory(dict)
    groups: list[GroupSpec] = attrs.Factory(list)
    pretrained: PretrainedConfig | None = None


@attrs.frozen(kw_only=True)
class EarlyStoppingConfig:
    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    patience: int = attrs.field(default=10, validator=_positive)
    min_delta: float = attrs.field(default=0.0, validator=_non_negative)


@attrs.frozen(kw_only=True)
class TrainConfig:
    epochs: int = attrs.field(default=30, validator=_positive)
    batch_size: int = attrs.field(default=16, validator=_positive)
    lr: float = attrs.field(default=1e-3, validator=_positive)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    weight_decay: float = attrs.field(default=0.0, validator=_non_negative)
    momentum: float = attrs.field(default=0.9, validator=_non_negative)
    grad_clip: float | None = attrs.field(default=None, validator=_positive)
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
    # lr scheduler (moola_engine.schedulers): composes with the strategy's per-group lr scales
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


@attrs.frozen(kw_only=True)
class DataConfig:
    kind: str = "npz"
    """Which loader builds the dataset; its own keys live in ``options``."""
    path: str | None = None
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
class RunConfig:
    strategy: str | None = None
    strategies_file: str | None = None
    runs_dir: str = "runs"
    name: str | None = None
    console: Literal["pretty", "json", "none"] = "pretty"
    allow: list[str] = attrs.Factory(list)
    """Explicit overrides of schedule validation (e.g. ``never-unfreeze``), recorded in the log."""


@attrs.frozen(kw_only=True)
class ExperimentConfig:
    run: RunConfig = attrs.Factory(RunConfig)
    train: TrainConfig = attrs.Factory(TrainConfig)
    model: ModelConfig = attrs.Factory(ModelConfig)
    data: DataConfig = attrs.Factory(DataConfig)
    checks: ChecksConfig = attrs.Factory(ChecksConfig)
    checkpoint: CheckpointConfig = attrs.Factory(CheckpointConfig)
    source: str = attrs.field(default="<defaults>", metadata={"toml": False})


# --------------------------------------------------------------------------- reading


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file; a missing file or a syntax error is a :class:`ConfigError` naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), f"cannot read: {exc}") from exc
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


# ExperimentConfig.source is not a TOML key: keep it out of structuring.
converter.register_structure_hook(
    ExperimentConfig,
    cattrs.gen.make_dict_structure_fn(
        ExperimentConfig, converter, _cattrs_forbid_extra_keys=True, source=cattrs.gen.override(omit=True)
    ),
)
