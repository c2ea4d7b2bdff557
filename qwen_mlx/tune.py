"""`python -m qwen_mlx.tune [--model PATH]`: decide on this machine where each hand-written kernel pays.

It measures in the model, not in isolation: whole decode steps (one token, a cache of `--context`
tokens, one step in flight as `generate_step` runs them) and prefill chunks (`--prefill` tokens,
fresh cache), with all references and with one kernel on at a time, the settings alternated
within each round. A kernel is turned on in a phase where its median over `--rounds` rounds beats
the references' by more than `--min-gain`. Then the combined table is checked against all
references in both phases (alternated again); a phase where it is slower gets its kernels turned
off. The table, its timings and the check go to `qwen_mlx.kernel_table`'s file for this machine
and model, which `load()` applies from then on.
"""

from __future__ import annotations

import statistics
import sys
import time
from datetime import datetime, timezone
from typing import Callable, Optional

import mlx.core as mx

import metal_kernels as K

from . import kernel_table
from .generation import generate_step
from .cli import ArgumentParser, runtime_error

OFF = {op: None for op in K.USE}


def time_decode(model, steps: int, context: int, seed: int = 0) -> float:
    """Seconds per decode step: `steps` greedy steps of `generate_step` (one step in flight) after a
    `context`-token prompt and one unmeasured step."""
    ids = mx.random.randint(0, model.args.vocab_size, (context,), key=mx.random.key(seed))
    gen = generate_step(ids, model, max_tokens=steps + 2)
    next(gen), next(gen)  # the prefill's token and one unmeasured step
    tic = time.perf_counter()
    for _ in gen:
        pass
    return (time.perf_counter() - tic) / steps


def time_prefill(model, tokens: int, seed: int = 0) -> float:
    """Seconds for one prefill chunk of `tokens` tokens into a fresh cache."""
    ids = mx.random.randint(0, model.args.vocab_size, (1, tokens), key=mx.random.key(seed))
    mx.eval(ids)
    tic = time.perf_counter()
    mx.eval(model(ids, cache=model.make_cache(), last_only=True))
    return time.perf_counter() - tic


def _stats(xs: list) -> dict:
    return {"median_ms": 1e3 * statistics.median(xs), "min_ms": 1e3 * min(xs), "max_ms": 1e3 * max(xs),
            "rounds": len(xs)}


def measure(model, settings: dict, phases: dict, rounds: int, log: Callable = print) -> dict:
    """{phase: {setting: stats}}: each round runs every setting once per phase, in a rotated order."""
    times = {ph: {s: [] for s in settings} for ph in phases}
    names = list(settings)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for ph, run in phases.items():
            for s in order:
                K.set_table(settings[s], f"tune: {s}")
                times[ph][s].append(run())
        log(f"  round {r + 1}/{rounds} done")
    return {ph: {s: _stats(v) for s, v in t.items()} for ph, t in times.items()}


def tune(model, rounds: int = 5, decode_steps: int = 32, context: int = 128, prefill: int = 512,
         min_gain: float = 0.02, log: Callable = print) -> tuple[dict, dict]:
    """(table, evidence) for `model` on this machine (see the module docstring)."""
    phases = {"decode": lambda: time_decode(model, decode_steps, context),
              "prefill": lambda: time_prefill(model, prefill)}
    rows = {"decode": 1, "prefill": prefill}
    mode, before = K.mode(), (dict(K.USE), K.table_source())
    K.set_backend("auto")
    try:
        for run in phases.values():  # compile every kernel once before anything is timed
            for op in K.USE:
                K.set_table({**OFF, op: (1, None)}, "tune: warm-up")
                run()
        settings = {"reference": OFF, **{op: {**OFF, op: (1, None)} for op in K.USE}}
        log(f"timing {len(settings)} settings x {len(phases)} phases x {rounds} rounds")
        single = measure(model, settings, phases, rounds, log)
        wins = {op: [ph for ph in phases if single[ph][op]["median_ms"]
                     < (1 - min_gain) * single[ph]["reference"]["median_ms"]] for op in K.USE}
        table = {op: _rule(w, rows) for op, w in wins.items()}
        check = None
        if any(table.values()):
            log("checking the combined table against all references")
            check = measure(model, {"reference": OFF, "table": table}, phases, rounds, log)
            for ph in phases:
                if check[ph]["table"]["median_ms"] > check[ph]["reference"]["median_ms"]:
                    log(f"  the table is slower at {ph}: its kernels there are turned off")
                    wins = {op: [p for p in w if p != ph] for op, w in wins.items()}
            table = {op: _rule(w, rows) for op, w in wins.items()}
    finally:
        K.set_backend(mode)
        K.set_table(*before)  # what was in use before tuning
    evidence = {"single": single, "check": check, "rows": rows, "min_gain": min_gain,
                "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "settings": {"rounds": rounds, "decode_steps": decode_steps, "context": context, "prefill": prefill}}
    return table, evidence


def _rule(phases_won: list, rows: dict) -> Optional[tuple]:
    """decode and prefill: always; prefill only: chunks of at least the measured prefill length;
    decode only: single-row calls (one sequence decoding); neither: off."""
    if "decode" in phases_won and "prefill" in phases_won:
        return (1, None)
    if "prefill" in phases_won:
        return (rows["prefill"], None)
    if "decode" in phases_won:
        return (1, 2)
    return None


def report(table: dict, evidence: dict) -> list:
    lines = []
    for ph, stats in evidence["single"].items():
        ref = stats["reference"]["median_ms"]
        cells = ", ".join(f"{s} {st['median_ms']:.3f} ms ({ref / st['median_ms']:.2f}x)"
                          for s, st in stats.items() if s != "reference")
        lines.append(f"{ph} (rows {evidence['rows'][ph]}): reference {ref:.3f} ms; {cells}")
    if evidence["check"]:
        for ph, st in evidence["check"].items():
            lines.append(f"check {ph}: table {st['table']['median_ms']:.3f} ms vs reference "
                         f"{st['reference']['median_ms']:.3f} ms")
    lines.append("table: " + ", ".join(f"{op} {K.describe_rule(r)}" for op, r in table.items()))
    return lines


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m qwen_mlx.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a .gguf file or converted model directory (default: the default model)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: bfloat16 on a GPU")
    p.add_argument("--rounds", type=int, default=5, help="rounds of alternated settings (median over them)")
    p.add_argument("--decode-steps", type=int, default=32, help="decode steps timed per measurement")
    p.add_argument("--context", type=int, default=128, help="prompt tokens before the timed decode steps")
    p.add_argument("--prefill", type=int, default=512, help="tokens in the timed prefill chunk")
    p.add_argument("--min-gain", type=float, default=0.02, help="a kernel must be this much faster (0.02 = 2%%)")
    a = p.parse_args(argv)
    for flag in ("rounds", "decode_steps", "context", "prefill"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if not 0 <= a.min_gain < 1:
        p.error("--min-gain must be in [0, 1)")
    try:
        from .loader import load

        if K.backend() == "reference":
            raise RuntimeError("no GPU back end (Metal or CUDA) is in use here: the references always run, "
                               "there is nothing to tune")
        model, _ = load(a.model, dtype=a.dtype)
        key = kernel_table.machine_key(model)
        print(f"tuning {key['geometry']} {key['dtype']} on {key['device']} ({key['backend']}, MLX {key['mlx']})",
              file=sys.stderr)
        table, evidence = tune(model, a.rounds, a.decode_steps, a.context, a.prefill, a.min_gain,
                               log=lambda s: print(s, file=sys.stderr))
        evidence["command"] = "python -m qwen_mlx.tune " + " ".join(sys.argv[1:] if argv is None else argv)
        path = kernel_table.save(key, table, evidence)
    except (ValueError, OSError, RuntimeError) as e:
        return runtime_error(e)
    for line in report(table, evidence):
        print(line)
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
