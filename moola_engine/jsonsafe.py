"""Strict JSON for the files moola-engine writes and reads back (state.json, config.json, result.json, ...).

``json.dump`` writes ``NaN`` and ``Infinity`` by default, which no other JSON reader accepts.  Here a
non-finite float is written as ``{"$float": "nan"}`` (``"inf"``, ``"-inf"``): strict JSON that names what
it is, and that :func:`loads` turns back into the float, so a checkpoint round-trips ``math.inf``
(an early-stopping best before the first epoch) exactly.  A plain string ``"inf"`` stays a string.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

TAG = "$float"


def encode(obj: Any) -> Any:
    """``obj`` with every non-finite float (also inside dicts, lists and tuples) replaced by its tagged form."""
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return {TAG: "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")}
    if isinstance(obj, Mapping):
        return {k: encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode(v) for v in obj]
    return obj


def _hook(d: dict[str, Any]) -> Any:
    if len(d) == 1 and TAG in d and d[TAG] in ("nan", "inf", "-inf"):
        return float(d[TAG])
    return d


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict JSON (``allow_nan=False``); non-finite floats tagged, see :func:`encode`."""
    return json.dumps(encode(obj), allow_nan=False, **kwargs)


def dump(obj: Any, fh: Any, **kwargs: Any) -> None:
    json.dump(encode(obj), fh, allow_nan=False, **kwargs)


def loads(text: str | bytes) -> Any:
    """Parse JSON written by :func:`dumps` (tagged non-finite floats come back as floats)."""
    return json.loads(text, object_hook=_hook)
