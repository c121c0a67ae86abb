"""``moola-engine export``: a finished (or interrupted) run's weights, whole or one module, as ``.safetensors``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moola_engine.errors import MoolaError


def final_weights(run_dir: Path) -> tuple[Path, str]:
    """The run's final weights: ``model.safetensors`` (written when training ends), else the newest checkpoint's."""
    from moola_engine.runs.checkpoint import list_checkpoints

    final = run_dir / "model.safetensors"
    if final.is_file():
        return final, "final weights"
    ckpts = [c for c in list_checkpoints(run_dir) if (c / "model.safetensors").is_file()]
    if ckpts:
        return ckpts[-1] / "model.safetensors", f"checkpoint {ckpts[-1].name} (the run has no final weights)"
    raise MoolaError(f"{run_dir}: no model.safetensors and no checkpoint: the run saved no weights "
                     "(it stopped before its first checkpoint, or checkpoints were off)")


def _rows(run_dir: Path) -> dict[str, int]:
    from moola_engine.logs import Event, read_events

    try:
        loaded = [e for e in read_events(run_dir / "events.jsonl") if e.get("event") == Event.DATA_LOADED]
    except MoolaError:
        return {}
    return {k: int(loaded[-1][k]) for k in ("train", "val") if k in loaded[-1]} if loaded else {}


def export_run(run_dir: Path, module: Sequence[str] | None, out: Path) -> dict[str, Any]:
    """Write the tensors ``module`` selects (None: all) of the run's final weights to ``out`` with a sidecar."""
    from moola_engine.core.components import default_registries
    from moola_engine.core.export import save_weights, select_state
    from moola_engine.core.freezing import resolve_groups
    from moola_engine.core.models import build_model, group_specs
    from moola_engine.runs.folders import write_json_atomic
    from moola_engine.runs.objectives import data_seen
    from moola_engine.runs.resume import run_config, run_record
    from moola_engine.safeio import load_safetensors

    cfg = run_config(run_dir)
    rec = run_record(run_dir)
    weights, origin = final_weights(run_dir)
    model = build_model(cfg.model, cfg.source, models=default_registries()["model"], base_dir=cfg.base_dir)
    missing, unexpected = model.load_state_dict(load_safetensors(weights), strict=False)
    if missing or unexpected:
        raise MoolaError(f"{weights} does not fit the run's model ({cfg.model.name}): missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    groups = resolve_groups(model, group_specs(model, cfg.model))
    modules = dict(model.named_modules())
    if module is not None and list(module) == ["encoder"] and "encoder" not in modules \
            and not any(g.name.startswith("encoder.") or g.name == "encoder" for g in groups):
        module = None  # "encoder": everything outside the head groups
        selected = "encoder (every tensor outside the head groups)"
    elif module is None:
        selected = "all"
    else:
        selected = ",".join(module)
    if module is None and selected == "all":
        state = model.state_dict()
        tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    else:
        tensors = select_state(model, groups, module)
    meta_path = run_dir / "data.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    val_chose = cfg.train.restore_best or cfg.train.early_stopping is not None
    seen = data_seen(cfg, rows=_rows(run_dir), meta=meta,
                     trained_on="train rows; validation rows chose the best epoch or the stop" if val_chose
                     else "train rows (validation reported only)")
    if val_chose and "cut_date" in seen:
        # the validation period reached the weights through model selection: the encoder saw up to its end
        val_end = ((meta.get("splits") or {}).get("val") or {}).get("last_bar")
        seen["train_cut_date"] = seen.pop("cut_date")
        if val_end is not None:
            seen["cut_date"] = max(str(val_end), str(seen["train_cut_date"]))
        else:
            seen["cut_date_unknown"] = ("validation rows chose the weights and the data reports no validation end "
                                        "(splits.val.last_bar): a run using this encoder cannot prove it saw no "
                                        "later data")
    sidecar: dict[str, Any] = {
        "exported_from": str(run_dir), "run_id": run_dir.name, "strategy": rec.get("strategy"), "weights": str(weights),
        "weights_origin": origin, "module": selected, "keys": sorted(tensors),
        "model": {"name": cfg.model.name, "params": cfg.model.params}, "task": cfg.task.name, "data_seen": seen,
    }
    if "cut_date" in seen:
        sidecar["cut_date"] = seen["cut_date"]
    path = save_weights(tensors, out, {"run_id": run_dir.name})
    side = out.with_suffix(".json")
    write_json_atomic(side, sidecar)
    return {"path": path, "sidecar": side, "tensors": len(tensors), "source": origin}
