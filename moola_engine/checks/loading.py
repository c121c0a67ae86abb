"""Pretrained weights: load by explicit key-mapping rules, then prove what was loaded.

``[model.pretrained]`` names a file (``.safetensors`` preferred; a torch
checkpoint is read with ``torch.load(weights_only=True)``: a pickle that needs
more than tensors is refused, nobody's checkpoint runs code here) and the rules
that map its keys onto the model's:

1. ``strip_prefix`` is removed from every file key that starts with it;
2. each ``[[model.pretrained.rename]]`` rule is applied in order (``re.sub``);
3. ``lstm_layers = [0]`` keeps only those layers of an ``nn.LSTM`` (all of a
   layer's tensors, ``_reverse`` included) and renumbers them from 0, so layer 0
   of a 2-layer bidirectional encoder loads into a 1-layer one;
4. ``add_prefix`` is put in front of every key.

After loading, every tensor is compared with ``torch.equal`` against the file
(the exact-equality proof; the engine takes it again right before the first
training step, :func:`changed_since_load`), and the report (loaded / missing / unexpected /
shape-mismatched keys, and per tensor its std against the std the module's own
default initialisation gives) is logged as ``weights.loaded``.

Refused with a :class:`~moola_engine.errors.WeightsError` naming the file:
no key matched; a shape does not fit (the key and both shapes are named);
fewer tensors than ``min_loaded`` (default: every tensor of the groups in
``groups``, default the non-head groups); every loaded tensor looks freshly
initialised (unless ``allow_fresh_init``).

``enabled = false`` is the random-encoder control: the file is not read, the
run logs ``weights.control``, and everything else stays equal.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from moola_engine.config import PretrainedConfig
from moola_engine.core.freezing import ParamGroup
from moola_engine.core.state import changed_since_load, equals_loaded  # noqa: F401  (re-exported: the proof)
from moola_engine.errors import WeightsError
from moola_engine.logs import Event, get_logger
from moola_engine.safeio import load_torch_file

# A freshly initialised tensor has the std its init gives (within sampling noise) and stays inside
# the init's range.  Trained weights leave at least one of the two.
FRESH_MIN_TOLERANCE = 0.03
FRESH_MAX_TOLERANCE = 1.02
REFERENCE_SAMPLES = 4096
MIN_NUMEL_FOR_FRESH_VERDICT = 16

_LSTM_KEY = re.compile(r"^(?P<stem>.*(?:weight|bias)_(?:ih|hh|hr))_l(?P<layer>\d+)(?P<rev>_reverse)?$")
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "encoder_state_dict", "encoder")


@attrs.frozen(kw_only=True)
class TensorReport:
    key: str
    """Key in the model."""
    source_key: str
    """Key in the file."""
    shape: list[int]
    std: float
    init_std: float | None
    """Std of the same tensor under the module's default init (None: the module has no ``reset_parameters``)."""
    std_ratio: float | None
    looks_fresh: bool | None
    exact: bool


@attrs.frozen(kw_only=True)
class LoadReport:
    path: str
    format: str
    sha256: str
    file_tensors: int
    loaded: list[str]
    missing: list[str]
    """Model keys the file did not provide."""
    unexpected: list[str]
    """File keys (after mapping) the model does not have."""
    dropped: list[str]
    """File keys left out on purpose by ``lstm_layers``."""
    mismatched: list[tuple[str, list[int], list[int]]]
    """(model key, file shape, model shape)."""
    tensors: list[TensorReport]
    required: int
    required_groups: list[str]

    @property
    def exact(self) -> bool:
        return bool(self.tensors) and all(t.exact for t in self.tensors)

    @property
    def all_fresh(self) -> bool:
        judged = [t for t in self.tensors if t.looks_fresh is not None]
        big = [t for t in judged if _numel(t.shape) >= MIN_NUMEL_FOR_FRESH_VERDICT] or judged
        return bool(big) and all(t.looks_fresh for t in big)

    def summary(self) -> str:
        return (f"{len(self.loaded)}/{self.file_tensors} tensors from {Path(self.path).name}"
                f"{' (exact)' if self.exact else ' (NOT exact)'}")

    def to_event(self) -> dict[str, Any]:
        return {
            "path": self.path, "format": self.format, "sha256": self.sha256, "file_tensors": self.file_tensors,
            "loaded": len(self.loaded), "required": self.required, "required_groups": self.required_groups,
            "keys": self.loaded, "missing": self.missing, "unexpected": self.unexpected, "dropped": self.dropped,
            "mismatched": [{"key": k, "file_shape": a, "model_shape": b} for k, a, b in self.mismatched],
            "exact": self.exact, "all_fresh": self.all_fresh,
            "tensors": [attrs.asdict(t) for t in self.tensors], "summary": self.summary(),
        }


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# --------------------------------------------------------------------------- reading


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """Tensors of a ``.safetensors`` file or a tensors-only torch checkpoint, on CPU, and the format name.

    A checkpoint holding ``{"state_dict": {...}}`` (or ``model_state_dict``, ``model``,
    ``encoder_state_dict``, ``encoder``) is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such pretrained weights file (model.pretrained.path)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu")), "safetensors"
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"{path}: not a readable .safetensors file ({exc})") from exc
    obj = load_torch_file(path)  # refuses a pickle that needs code, without running it
    tensors = _tensor_dict(obj)
    if tensors is None and isinstance(obj, Mapping):
        for key in _NESTED_KEYS:
            tensors = _tensor_dict(obj.get(key))
            if tensors is not None:
                return tensors, f"torch[{key}]"
    if tensors is None:
        what = f"a dict with keys {', '.join(map(str, list(obj)[:8]))}" if isinstance(obj, Mapping) else type(obj).__name__
        raise WeightsError(f"{path}: expected a dict of tensors (a state_dict), found {what}")
    return tensors, "torch"


def _tensor_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, Mapping) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return dict(obj)
    return None


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- key mapping


def map_keys(keys: Sequence[str], cfg: PretrainedConfig) -> tuple[dict[str, str], list[str]]:
    """Model key -> file key under ``cfg``'s rules, and the file keys dropped by ``lstm_layers``.

    Two file keys mapping onto one model key is a :class:`WeightsError`.
    """
    rules = []
    for i, rule in enumerate(cfg.rename):
        try:
            rules.append((re.compile(rule.pattern), rule.replace))
        except re.error as exc:
            raise WeightsError(f"model.pretrained.rename[{i}].pattern {rule.pattern!r}: invalid regex ({exc})") from exc
    layers = {layer: i for i, layer in enumerate(cfg.lstm_layers)} if cfg.lstm_layers is not None else None
    mapping: dict[str, str] = {}
    dropped: list[str] = []
    for src in keys:
        key = src[len(cfg.strip_prefix):] if cfg.strip_prefix and src.startswith(cfg.strip_prefix) else src
        for pattern, replace in rules:
            key = pattern.sub(replace, key)
        if layers is not None:
            m = _LSTM_KEY.match(key)
            if m is not None:
                layer = int(m["layer"])
                if layer not in layers:
                    dropped.append(src)
                    continue
                key = f"{m['stem']}_l{layers[layer]}{m['rev'] or ''}"
        key = cfg.add_prefix + key
        if key in mapping:
            raise WeightsError(f"model.pretrained: file keys {mapping[key]!r} and {src!r} both map to {key!r}")
        mapping[key] = src
    return mapping, dropped


def _prefix_hint(file_keys: Sequence[str], model_keys: Sequence[str]) -> str:
    """Suggest strip_prefix / add_prefix when file and model keys differ only by a prefix."""
    for fk in file_keys:
        for mk in model_keys:
            if fk != mk and fk.endswith("." + mk):
                return f'; set strip_prefix = "{fk[: len(fk) - len(mk)]}"'
            if fk != mk and mk.endswith("." + fk):
                return f'; set add_prefix = "{mk[: len(mk) - len(fk)]}"'
    return ""


# --------------------------------------------------------------------------- fresh-init reference


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str] | None:
    mod_name, _, attr = key.rpartition(".")
    try:
        return model.get_submodule(mod_name) if mod_name else model, attr
    except AttributeError:
        return None


def init_reference(model: nn.Module, key: str, _cache: dict[int, nn.Module] | None = None) -> torch.Tensor | None:
    """Values of ``key`` as the owning module's ``reset_parameters()`` draws them (flattened, on a copy, RNG untouched).

    Small tensors are drawn several times (at least ``REFERENCE_SAMPLES`` values) so the reference std is precise.
    """
    found = _owner(model, key)
    if found is None:
        return None
    module, attr = found
    if not callable(getattr(module, "reset_parameters", None)):
        return None
    cache = _cache if _cache is not None else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12345)
        fresh = cache.get(id(module))
        if fresh is None:
            fresh = cache[id(module)] = copy.deepcopy(module).cpu()
        draws: list[torch.Tensor] = []
        total = 0
        while total < REFERENCE_SAMPLES and len(draws) < 64:
            fresh.reset_parameters()  # type: ignore[operator]
            t = getattr(fresh, attr, None)
            if not isinstance(t, torch.Tensor) or t.numel() == 0:
                return None
            draws.append(t.detach().reshape(-1).clone())
            total += t.numel()
    return torch.cat(draws)


def fresh_stats(tensor: torch.Tensor, ref: torch.Tensor | None) -> tuple[float, float | None, float | None, bool | None]:
    """(std, init std, ratio, looks fresh) of ``tensor`` against init draws ``ref``.

    Fresh means: the std is within sampling noise of the init's (4 standard errors of a
    sample std over ``tensor.numel()`` values, at least 3%) and no value lies outside the
    init's range.  Trained weights fail at least one of the two.
    """
    t = tensor.detach().double().cpu()
    std = float(t.std()) if t.numel() > 1 else 0.0
    if ref is None or not t.is_floating_point():
        return std, None, None, None
    r = ref.double()
    ref_std = float(r.std()) if r.numel() > 1 else 0.0
    if ref_std == 0.0:  # constant init (zeros, ones): fresh means equal to it
        return std, 0.0, None, bool(torch.equal(t.reshape(-1), r[: t.numel()]))
    ratio = std / ref_std
    tolerance = max(FRESH_MIN_TOLERANCE, 4.0 * math.sqrt(0.5 / max(t.numel(), 1)))
    inside = float(t.abs().max()) <= FRESH_MAX_TOLERANCE * float(r.abs().max())
    return std, ref_std, ratio, abs(ratio - 1.0) <= tolerance and inside


# --------------------------------------------------------------------------- loading


def load_pretrained(
    model: nn.Module,
    cfg: PretrainedConfig | None,
    *,
    groups: Sequence[ParamGroup] = (),
    base_dir: Path | None = None,
    log: Any = None,
) -> dict[str, torch.Tensor] | None:
    """Load ``cfg`` into ``model`` and log the proof; return model key -> tensor as loaded (CPU).

    Returns None when there is nothing to load (no ``[model.pretrained]``) or for the
    random-encoder control (``enabled = false``, logged as ``weights.control``).
    """
    log = log or get_logger()
    if cfg is None:
        return None
    path = Path(cfg.path)
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    if not cfg.enabled:
        log.warning(Event.WEIGHTS_CONTROL, path=str(path),
                    message="random-encoder control: pretrained weights NOT loaded, everything else equal")
        return None
    report, loaded = load_into(model, path, cfg, groups=groups)
    log.info(Event.WEIGHTS_LOADED, **report.to_event())
    return loaded


def load_into(
    model: nn.Module, path: str | Path, cfg: PretrainedConfig, *, groups: Sequence[ParamGroup] = ()
) -> tuple[LoadReport, dict[str, torch.Tensor]]:
    """Map, check, copy and prove.  Raises :class:`WeightsError` for every refusal listed in the module doc."""
    path = Path(path)
    file_tensors, fmt = read_tensors(path)
    mapping, dropped = map_keys(list(file_tensors), cfg)
    target = model.state_dict(keep_vars=True)
    model_keys = list(target)

    matched = [k for k in mapping if k in target]
    unexpected = sorted(k for k in mapping if k not in target)
    mismatched = [(k, list(file_tensors[mapping[k]].shape), list(target[k].shape))
                  for k in matched if tuple(file_tensors[mapping[k]].shape) != tuple(target[k].shape)]
    if not matched:
        raise WeightsError(
            f"{path}: loaded nothing: none of its {len(file_tensors)} keys matches a model key after mapping "
            f"(file: {', '.join(sorted(mapping)[:3])}{', ...' if len(mapping) > 3 else ''}; model: "
            f"{', '.join(model_keys[:3])}{', ...' if len(model_keys) > 3 else ''})"
            + _prefix_hint(sorted(mapping), model_keys)
        )
    if mismatched:
        lines = "; ".join(f"{k}: file {tuple(a)} vs model {tuple(b)}" for k, a, b in mismatched)
        raise WeightsError(f"{path}: {len(mismatched)} tensor(s) do not fit the model: {lines}")

    # --- which tensors must be loaded
    head = {g.name for g in groups if g.head}
    by_name = {g.name: g for g in groups}
    unknown = [g for g in cfg.groups if g not in by_name]
    if unknown and groups:
        raise WeightsError(f"model.pretrained.groups: unknown group(s) {', '.join(unknown)}; "
                           f"groups are: {', '.join(by_name)}")
    req_groups = list(cfg.groups) or ([g.name for g in groups if g.name not in head] if cfg.min_loaded is None else [])
    required_keys = [n for g in req_groups if g in by_name for n, _ in by_name[g].params]
    required = cfg.min_loaded if cfg.min_loaded is not None else len(required_keys)
    not_loaded = [k for k in required_keys if k not in mapping]
    if not_loaded:
        raise WeightsError(
            f"{path}: {len(not_loaded)} tensor(s) of pretrained group(s) {', '.join(req_groups)} are not in the file "
            f"after mapping: {', '.join(not_loaded)} (loaded {len(matched)}: {', '.join(matched[:4])}"
            f"{', ...' if len(matched) > 4 else ''})" + _prefix_hint(sorted(unexpected), not_loaded)
        )
    if len(matched) < required:
        raise WeightsError(f"{path}: loaded {len(matched)} tensor(s), fewer than model.pretrained.min_loaded = {required}")

    # --- copy, then prove each tensor equal to the file
    reports: list[TensorReport] = []
    cache: dict[int, nn.Module] = {}
    loaded: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key in matched:
            dst = target[key]
            src = file_tensors[mapping[key]]
            dst.copy_(src.to(device=dst.device, dtype=dst.dtype))
    after = model.state_dict()
    for key in matched:
        src = file_tensors[mapping[key]]
        now = after[key]
        exact = equals_loaded(now, src)
        std, ref_std, ratio, fresh = fresh_stats(now, init_reference(model, key, cache))
        reports.append(TensorReport(key=key, source_key=mapping[key], shape=list(now.shape), std=std,
                                    init_std=ref_std, std_ratio=ratio, looks_fresh=fresh, exact=exact))
        loaded[key] = now.detach().cpu().clone()
    report = LoadReport(
        path=str(path), format=fmt, sha256=file_sha256(path), file_tensors=len(file_tensors), loaded=matched,
        missing=[k for k in model_keys if k not in mapping], unexpected=unexpected, dropped=dropped,
        mismatched=[], tensors=reports, required=required, required_groups=req_groups,
    )
    if not report.exact:
        bad = [t.key for t in reports if not t.exact]
        raise WeightsError(f"{path}: after loading, {', '.join(bad)} differ(s) from the file (dtype or device cast?)")
    if report.all_fresh and not cfg.allow_fresh_init:
        ratios = ", ".join(f"{t.key} std {t.std:.4g} vs init {t.init_std:.4g}" for t in reports[:3] if t.init_std)
        raise WeightsError(
            f"{path}: every loaded tensor looks freshly initialised ({ratios}, ...): was the encoder ever trained? "
            "Set model.pretrained.allow_fresh_init = true to load it anyway."
        )
    return report, loaded
