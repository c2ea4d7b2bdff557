"""Per-machine kernel tables: where `python -m qwen_mlx.tune` stores its decisions, and how `load()`
applies them.

A table says, per hand-written kernel, for which numbers of token rows it runs instead of its
plain-MLX reference (`metal_kernels.USE`). It is keyed by what the timings depend on: the device
name, the back end, the MLX version, the model geometry, the activation dtype and whether the
weights are quantized. It lives in `<cache dir>/kernels/<key>.json` (`qwen_mlx.fetch.cache_dir`).
Without a table for the key, the shipped defaults of the back end hold (`metal_kernels.SHIPPED`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

import mlx.core as mx

import metal_kernels as K

from .fetch import cache_dir
from .model import is_quantized

FORMAT = 1


def device_name() -> str:
    try:
        return str(mx.device_info().get("device_name") or "unknown device")
    except Exception:  # noqa: BLE001 (older MLX: no device_info)
        return "unknown device"


def machine_key(model) -> dict:
    """What a table is valid for: device, back end, MLX version, geometry, dtype, quantized or not."""
    a = model.args
    return {"device": device_name(), "backend": K._core.gpu_backend() or "cpu", "mlx": mx.__version__,
            "geometry": f"h{a.hidden_size}-l{a.num_hidden_layers}-ffn{a.intermediate_size}"
                        f"-heads{a.num_attention_heads}x{a.num_key_value_heads}-d{a.head_dim}",
            "dtype": str(model.model.norm.weight.dtype).split(".")[-1], "quantized": is_quantized(model)}


def table_path(key: dict) -> Path:
    parts = [key["device"], key["backend"], "mlx" + key["mlx"], key["geometry"], key["dtype"],
             "q" if key["quantized"] else "f"]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(parts)).strip("_")
    return cache_dir() / "kernels" / f"{name}.json"


def save(key: dict, table: dict, evidence: dict, path: Optional[Path] = None) -> Path:
    """Write the table (atomically) and return its path."""
    path = Path(path) if path else table_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": FORMAT, "key": key, "table": {op: (list(r) if r else None) for op, r in table.items()},
           "evidence": evidence}
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)
    return path


def read(key: dict) -> Optional[dict]:
    """The stored document for `key`, or None. A file that does not parse, or was made for another key,
    is ignored with a one-line warning (the shipped defaults hold)."""
    path = table_path(key)
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != FORMAT or doc.get("key") != key or set(doc["table"]) != set(K.USE):
            raise ValueError("made for another machine, model or format")
        for r in doc["table"].values():
            K.rule(r)
    except (ValueError, KeyError, TypeError) as e:
        import warnings

        warnings.warn(f"{path}: kernel table ignored ({e})", stacklevel=2)
        return None
    doc["path"] = str(path)
    return doc


def apply(model) -> list:
    """Set `metal_kernels.USE` for `model` on this machine: its tuned table when there is one, else the
    shipped defaults. Returns `metal_kernels.describe()`'s lines (for --verbose)."""
    doc = read(machine_key(model))
    if doc is None:
        K.reset_table()
    else:
        K.set_table(doc["table"], f"tuned table {doc['path']}")
    return K.describe()
