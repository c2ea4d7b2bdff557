"""One rank of the tensor-parallel runs of tests/test_distributed.py; run alone (no launcher) it
is the single-process reference. For each job of the JSON list in argv[1] it loads the model,
and saves this rank's prompt last-position logits and generated tokens to OUT/NAME-rank{r}.npz:

    mlx.launch --backend ring --hosts 127.0.0.1 -n 2 -- python tests/dist_worker.py JOBS OUT

A job: {"name", "requests": [...]} (rank 0 broadcasts each, the others `follow`), or {"name", "model", "dtype": "float32", "quantized": false, "shard_after": false (load
whole, then model.shard()), "prompt": [ids], "tokens": 8, "temp": 0.0, "seed": null}.
Load errors are printed as "error: rank r/N: ..." and end the process with code 1.
"""

import json
import sys

import qwen_mlx  # noqa: F401  (BLAS before mlx.core)
import mlx.core as mx
import numpy as np

from qwen_mlx import load, stream_generate
from qwen_mlx.distributed import broadcast, follow, is_sharded, rank_prefix

jobs, out = json.loads(sys.argv[1]), sys.argv[2]
group = mx.distributed.init()
for job in jobs:
    if "requests" in job:  # a front end on rank 0 driving the others: broadcast / follow
        got = []
        if group.rank() == 0:
            got = [broadcast(r, group) for r in job["requests"]]
            broadcast(None, group)
        else:
            follow(got.append, group)
        np.savez(f"{out}/{job['name']}-rank{group.rank()}.npz", got=json.dumps(got))
        continue
    mx.reset_peak_memory()
    kw = dict(dtype=job.get("dtype", "float32"), quantized=job.get("quantized", False))
    try:
        if job.get("shard_after"):
            model, tok = load(job["model"], shard=False, **kw)
            model.shard(group)
            mx.eval(model.parameters())
        else:
            model, tok = load(job["model"], **kw)
    except ValueError as e:
        sys.exit(f"error: {rank_prefix(group)}{e}")
    load_peak = mx.get_peak_memory()
    ids = job.get("prompt", [1, 2, 3, 4, 5, 6, 7, 8])
    logits = model(mx.array([ids]))[0, -1].astype(mx.float32)
    mx.eval(logits)
    tokens = [r.token for r in stream_generate(model, tok, ids, max_tokens=job.get("tokens", 8),
                                               temperature=job.get("temp", 0.0), seed=job.get("seed"))]
    np.savez(f"{out}/{job['name']}-rank{group.rank()}.npz", logits=np.array(logits), tokens=np.array(tokens),
             size=group.size(), sharded=is_sharded(model), n_heads=model.layers[0].self_attn.n_heads,
             load_peak=load_peak, peak=mx.get_peak_memory())
    print(f"rank {group.rank()}/{group.size()}: {job['name']} done", flush=True)
