"""Look inside a forward pass: capture the named stages (`capture`) or replace them (`patch`).

    with capture(model, ["layers.*.residual", "logits"]) as acts:
        model(tokens)
    acts["layers.3.residual"]                      # [B, L, hidden], an mx.array

    with patch({"layers.2.mlp_out": lambda x: 0 * x}, model):   # or name -> array
        ablated = model(tokens)

Stage names, in forward order (`stage_names(model)`): `embed`; per layer i
`layers.{i}.attn_norm`, `.q`, `.k`, `.v` ([B, heads, L, head_dim], after bias and RoPE,
before the KV cache), `.attn_out` (attention output, heads merged, before o_proj),
`.o_proj`, `.mlp_norm`, `.mlp_out`, `.residual` (the stream after the layer);
`final_norm`, `logits`. Names may be glob patterns (fnmatch: `*` also crosses dots).

Both act on the model passed in, and only on it: they set that model's `tap_hook` (see
`qwen_mlx.model`), which is None (no cost) outside these blocks and restored on exit,
exceptions included; another model in the same process (a draft model, a reference copy) is
untouched. They nest: patches apply first, so a capture sees what flows on into the model.
With a KV cache each call sees only the new tokens; `acts[name]` is the latest call's value
and `acts.history[name]` every call's.
"""

from __future__ import annotations

import fnmatch
from contextlib import contextmanager
from typing import Callable, Iterable, Union

import mlx.core as mx

LAYER_STAGES = ("attn_norm", "q", "k", "v", "attn_out", "o_proj", "mlp_norm", "mlp_out", "residual")


def stage_names(model) -> list[str]:
    """Every stage name of `model`, in forward order."""
    layers = [f"layers.{i}.{s}" for i in range(len(model.layers)) for s in LAYER_STAGES]
    return ["embed", *layers, "final_norm", "logits"]


def _check(patterns: Iterable[str], model) -> None:
    if not hasattr(model, "tap_hook"):
        raise TypeError(f"expected a qwen_mlx Model (from qwen_mlx.load), got {type(model).__name__}")
    names = stage_names(model)
    for p in patterns:
        if not fnmatch.filter(names, p):
            raise ValueError(f"{p!r} matches no stage (stages look like {names[1]!r}; see stage_names(model))")


class _Hooks:
    """One model's active patches (outermost first) and captures; its `tap_hook` while any is active."""

    def __init__(self):
        self.patches: list[dict] = []
        self.captures: list[Callable[[str, mx.array], None]] = []

    def __call__(self, name: str, x: mx.array) -> mx.array:
        for patches in self.patches:
            for pattern, new in patches.items():
                if fnmatch.fnmatchcase(name, pattern):
                    x = new(x) if callable(new) else mx.broadcast_to(new, x.shape).astype(x.dtype)
        for record in self.captures:
            record(name, x)
        return x


@contextmanager
def _active(model, kind: str, item):
    hooks = model.tap_hook if isinstance(model.tap_hook, _Hooks) else _Hooks()
    stack = getattr(hooks, kind)
    stack.append(item)
    model.tap_hook = hooks
    try:
        yield
    finally:
        del stack[next(i for i, s in enumerate(stack) if s is item)]
        if not hooks.patches and not hooks.captures:
            model.tap_hook = None


class Activations(dict):
    """name -> the latest captured value; `history[name]` holds one value per forward call."""

    def __init__(self):
        super().__init__()
        self.history: dict[str, list[mx.array]] = {}


@contextmanager
def capture(model, names: Union[str, Iterable[str]] = "*"):
    """Record `model`'s stages matching `names` (a name, glob, or list of them) during the block."""
    names = [names] if isinstance(names, str) else list(names)
    _check(names, model)
    acts = Activations()

    def record(name: str, x: mx.array) -> None:
        if any(fnmatch.fnmatchcase(name, p) for p in names):
            acts[name] = x
            acts.history.setdefault(name, []).append(x)

    with _active(model, "captures", record):
        yield acts


@contextmanager
def patch(patches: dict, model):
    """Replace `model`'s stage outputs during the block: {name or glob: array | callable(array) -> array}.

    An array is broadcast to the stage's shape (and cast to its dtype); a callable gets the
    stage's output and returns the replacement. A name that matches no stage is a ValueError.
    """
    _check(patches, model)
    with _active(model, "patches", dict(patches)):
        yield
