"""The OpenAI-compatible HTTP server: `python -m qwen_mlx.server [--model PATH] [--port 8080]`.

Starlette on uvicorn serves `/v1/chat/completions`, `/v1/completions` (with `suffix`: code
infill), `/v1/models`, `/health` and a chat page at `/`. One scheduler thread owns the model, a
generation engine (`insert` / `remove` / `step`, the interface of `qwen_mlx.batch`) and the prompt
cache; HTTP handlers hand it validated requests through a queue and read each request's tokens back
from that request's own asyncio queue. A client that goes away cancels its sequence in the engine.
Wire format and validation: `openai_api.py`; prompt-cache reuse: `prompt_cache.py`.

Under `mlx.launch` (tensor parallelism, `docs/distributed.md`) rank 0 serves HTTP and the other
ranks run the same scheduler without it: every loop turn, rank 0 broadcasts what it takes from
its inbox (new requests with their prompt ids and sampling settings, cancellations, stop) and
every rank applies the same messages to its own engine and prompt cache in the same order, so all
ranks run the same forward passes together and sample the same tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import itertools
import json
import logging
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from importlib import resources
from pathlib import Path
from typing import Callable, Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from . import _blas  # noqa: F401  (before mlx.core)
import mlx.core as mx
from .cli import ArgumentParser, runtime_error
from .distributed import broadcast, rank_prefix
from .openai_api import (APIError, LogprobFormatter, ParsedRequest, chunk_body, parse_request, response_body, usage,
                         usage_chunk)
from .prompt_cache import PromptCache

log = logging.getLogger("qwen_mlx.server")


@dataclass
class Job:
    """One request on its way through the scheduler. Events (engine responses, or an APIError)
    arrive on `events`, put there from the scheduler thread with `loop.call_soon_threadsafe`."""
    req: ParsedRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    uid: Optional[int] = None
    tokens: list = field(default_factory=list)  # generated so far (scheduler thread)
    cached: int = 0  # prompt tokens found in the prompt cache
    finished: bool = False  # the handler saw the last event
    cancelled: bool = False
    jid: Optional[int] = None  # the scheduler's number for it (the same on every rank)

    def emit(self, event) -> None:
        if self.loop is not None:  # None: a stand-in on a rank other than 0 (nobody listens)
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Scheduler:
    """The one thread that touches MLX: loads the model, then loops: take new requests and
    cancellations from the inbox, run one engine step, hand each response to its job."""

    def __init__(self, load: Callable, make_engine: Callable, prompt_cache: PromptCache, group=None):
        self._load, self._make_engine, self.prompt_cache = load, make_engine, prompt_cache
        self.group = group if group is not None and group.size() > 1 else None  # mlx.launch's ranks
        self.follower = self.group is not None and self.group.rank() != 0
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.jobs: dict[int, Job] = {}  # engine uid -> job
        self._by_jid: dict[int, Job] = {}
        self._jids = itertools.count()
        self.stats = {"completed": 0, "cancelled": 0, "failed": 0, "peak_batch": 0}
        self.ready = threading.Event()
        self.error: Optional[BaseException] = None
        self.model = self.tokenizer = self.engine = None
        self.thread = threading.Thread(target=self._main, name="qwen-mlx-scheduler", daemon=True)

    def start(self, timeout: Optional[float] = None) -> None:
        self.thread.start()
        self.ready.wait(timeout)
        if self.error is not None:
            raise self.error

    def submit(self, job: Job) -> None:
        self.inbox.put(("add", job))

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        self.inbox.put(("cancel", job))

    def stop(self) -> None:
        self.inbox.put(("stop", None))

    def _main(self) -> None:
        try:
            self.model, self.tokenizer = self._load()
            self.engine = self._make_engine(self.model, self.tokenizer)
        except BaseException as e:
            self.error = e
            return
        finally:
            self.ready.set()
        while True:
            try:
                if not self._apply(self._collect(block=not self.engine.has_work())):
                    return
                if self.engine.has_work():
                    responses = self.engine.step()
                    self.stats["peak_batch"] = max(self.stats["peak_batch"], len(responses))
                    for r in responses:
                        self._deliver(r)
            except Exception:  # a bug, not bad input (that is refused before it gets here)
                log.exception("generation failed; failing the requests in flight")
                for job in self.jobs.values():
                    job.emit(APIError("generation failed (see the server log)", status=500, type="server_error"))
                self.stats["failed"] += len(self.jobs)
                self.jobs.clear()
                self._by_jid.clear()
                self.engine = self._make_engine(self.model, self.tokenizer)

    def _collect(self, block: bool) -> list:
        """This turn's messages as plain data: ["add", jid, prompt ids, sampling], ["cancel", jid],
        ["stop"]. Rank 0 takes them from the inbox (and broadcasts them under mlx.launch); the
        other ranks receive rank 0's."""
        if self.follower:
            return broadcast(None, self.group)
        raw = [self.inbox.get()] if block else []
        while True:
            try:
                raw.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        msgs = []
        for kind, job in raw:
            if kind == "stop":
                msgs.append(["stop"])
                break
            if kind == "add" and not job.cancelled:
                job.jid = next(self._jids)
                self._by_jid[job.jid] = job
                sampling = dict(job.req.sampling)
                if self.group and sampling.get("temperature", 0) > 0 and sampling.get("seed") is None:
                    sampling["seed"] = int(mx.random.randint(0, 2**31 - 1, ()).item())  # one draw, sent to all
                msgs.append(["add", job.jid, list(job.req.prompt), sampling])
            elif kind == "cancel" and job.jid is not None:
                msgs.append(["cancel", job.jid])
        return broadcast(msgs, self.group) if self.group else msgs

    def _apply(self, msgs: list) -> bool:
        """Apply one turn's messages to the engine and the prompt cache (the same on every rank); False at stop."""
        for msg in msgs:
            if msg[0] == "stop":
                return False
            if msg[0] == "add":
                _, jid, prompt, sampling = msg
                job = self._by_jid.get(jid)
                if job is None:  # a rank other than 0: a stand-in that records what the engine returns
                    job = self._by_jid[jid] = Job(req=SimpleNamespace(prompt=prompt, sampling=sampling), loop=None,
                                                  jid=jid)
                cache, rest, job.cached = self.prompt_cache.fetch(prompt)
                try:
                    job.uid = self.engine.insert(rest, cache=cache, return_cache=True, **sampling)
                except ValueError as e:  # the engine's own checks (the handler's should catch it first)
                    del self._by_jid[jid]
                    job.emit(APIError(str(e)))
                    continue
                self.jobs[job.uid] = job
            elif msg[0] == "cancel":
                job = self._by_jid.pop(msg[1], None)
                if job is not None and self.jobs.get(job.uid) is job:
                    self.engine.remove(job.uid)
                    del self.jobs[job.uid]
                    self.stats["cancelled"] += 1
        return True

    def _deliver(self, r) -> None:
        job = self.jobs.get(r.uid)
        if job is None:
            return
        job.tokens.append(r.token)
        cache, r.cache = r.cache, None
        if r.finish_reason is not None:
            del self.jobs[r.uid]
            self._by_jid.pop(job.jid, None)
            self.stats["completed"] += 1
            if cache:
                self.prompt_cache.store((job.req.prompt + job.tokens)[:cache[0].offset], cache)
        job.emit(r)

    def health(self) -> dict:
        return {"status": "ok", "active": len(self.jobs), **self.stats, "prompt_cache": self.prompt_cache.stats()}


class _Stream(StreamingResponse):
    """Server-sent events; `on_close` runs however the response ends (done, error, client gone)."""

    def __init__(self, content, on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _read_json(request, limit: int):
    size = request.headers.get("content-length", "")
    too_big = APIError(f"the request body is over the server's limit of {limit} bytes", status=413,
                       code="request_too_large")
    body, n = [], 0
    async for chunk in request.stream():  # read it all (discarding past the limit) so the client sees the answer
        n += len(chunk)
        if n <= limit:
            body.append(chunk)
        elif n > 16 * limit or size.isdigit() and int(size) > 16 * limit:
            raise too_big
    if n > limit:
        raise too_big
    try:
        return json.loads(b"".join(body))
    except (ValueError, RecursionError) as e:
        raise APIError(f"the request body is not valid JSON ({str(e)[:120]})")


def create_app(scheduler: Scheduler, *, model_id: str, defaults: dict, max_body_bytes: int = 4 << 20):
    tokenizer = scheduler.tokenizer
    context = scheduler.model.args.max_position_embeddings
    eos = set(tokenizer.eos_token_ids)
    page = resources.files("qwen_mlx").joinpath("static/chat.html").read_text("utf-8")
    started = int(time.time())

    def stop_token(r) -> bool:  # the EOS token that ended a sequence: no text, not listed in logprobs
        return r.finish_reason == "stop" and r.token in eos

    async def generate(request, kind: str):
        req = parse_request(await _read_json(request, max_body_bytes), kind, tokenizer, context, defaults)
        job = Job(req, asyncio.get_running_loop())
        scheduler.submit(job)
        fmt = LogprobFormatter(tokenizer, kind)
        if req.stream:
            return _Stream(_stream(job, fmt), on_close=lambda: job.finished or scheduler.cancel(job))
        try:
            out, checked = [], time.monotonic()
            while not out or out[-1].finish_reason is None:
                try:
                    ev = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    ev = None
                if time.monotonic() - checked > 0.5:  # is the client still there?
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)  # nobody is listening
                    checked = time.monotonic()
                if isinstance(ev, APIError):
                    raise ev
                if ev is not None:
                    out.append(ev)
            job.finished = True
        finally:
            if not job.finished:
                scheduler.cancel(job)
        listed = [r for r in out if not stop_token(r)]
        lp = fmt.entries(listed) if req.logprobs else None
        last = out[-1]
        use = usage(len(req.prompt), last.generation_tokens, job.cached)
        return JSONResponse(response_body(req, model_id, "".join(r.text for r in out), last.finish_reason, lp, use))

    async def _stream(job: Job, fmt: LogprobFormatter):
        req, offset = job.req, 0
        if req.kind == "chat":
            yield _sse(chunk_body(req, model_id, None, first=True))
        while True:
            ev = await job.events.get()
            if isinstance(ev, APIError):
                job.finished = True
                yield _sse(ev.body())
                break
            lp = fmt.entries([] if stop_token(ev) else [ev], offset) if req.logprobs else None
            offset += len(ev.text)
            if ev.finish_reason is not None:
                job.finished = True
            if ev.text or ev.finish_reason or lp and (lp.get("content") or lp.get("tokens")):
                yield _sse(chunk_body(req, model_id, ev.text, ev.finish_reason, lp))
            if ev.finish_reason is not None:
                if req.include_usage:
                    yield _sse(usage_chunk(req, model_id, usage(len(req.prompt), ev.generation_tokens, job.cached)))
                break
        yield "data: [DONE]\n\n"

    async def chat(request):
        return await generate(request, "chat")

    async def completions(request):
        return await generate(request, "text")

    async def models(request):
        return JSONResponse({"object": "list", "data": [
            {"id": model_id, "object": "model", "created": started, "owned_by": "qwen-mlx"}]})

    async def health(request):
        return JSONResponse({**scheduler.health(), "model": model_id})

    async def index(request):
        return HTMLResponse(page)

    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    async def http_error(request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        msg = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(APIError(msg, code=code, status=e.status_code).body(), status_code=e.status_code,
                            headers=e.headers)

    async def server_error(request, e: Exception):
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=e)
        return JSONResponse(APIError("internal server error", status=500, type="server_error").body(), status_code=500)

    routes = [Route("/v1/chat/completions", chat, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/", index, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={APIError: api_error, HTTPException: http_error,
                                                        Exception: server_error})


# ---- command line ----

def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m qwen_mlx.server", description="OpenAI-compatible HTTP server for a Qwen2.5 model.")
    p.add_argument("--model", help="GGUF file or converted model directory (default: the default model)")
    p.add_argument("--model-name", help="the model id the API reports (default: the file name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    p.add_argument("--quantized", action=argparse.BooleanOptionalAction, default=None)
    g = p.add_argument_group("sampling defaults (a request's own fields win)")
    g.add_argument("--max-tokens", "-m", type=int, default=512)
    g.add_argument("--temp", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g = p.add_argument_group("limits")
    g.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (batched engine)")
    g.add_argument("--prompt-cache-bytes", type=int, default=1 << 30, help="KV-cache memory kept for reuse")
    g.add_argument("--prompt-cache-size", type=int, default=8, help="number of KV caches kept for reuse")
    g.add_argument("--max-body-bytes", type=int, default=4 << 20, help="largest request body (else 413)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def make_engine(max_batch: int):
    from .batch import BatchGenerator

    return lambda model, tokenizer: BatchGenerator(model, tokenizer, max_batch=max_batch)


def main(argv: Optional[list] = None) -> None:
    p = build_parser()
    a = p.parse_args(argv)
    defaults = dict(max_tokens=a.max_tokens, temperature=a.temp, top_p=a.top_p, top_k=a.top_k, min_p=a.min_p,
                    repetition_penalty=a.repetition_penalty)
    if not 0 < a.port < 65536:
        p.error("--port must be in 1..65535")
    for name in ("max_batch", "max_body_bytes"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    try:  # the sampling defaults go through the same checks as a request's fields
        parse_request({"prompt": [0], **defaults}, "text", _NoTokenizer(), 1 << 30, defaults)
    except APIError as e:
        p.error(f"bad sampling default: {e.message}")
    logging.basicConfig(level=a.log_level.upper(), format="%(levelname)s: %(message)s")
    import uvicorn

    from .loader import load

    group = mx.distributed.init()  # one rank unless started by mlx.launch
    model_id = a.model_name or (Path(a.model).stem if a.model else "qwen2.5-coder-0.5b-instruct-q4_k_m")
    scheduler = Scheduler(lambda: load(a.model, dtype=a.dtype, quantized=a.quantized), make_engine(a.max_batch),
                          PromptCache(max_bytes=a.prompt_cache_bytes, max_entries=a.prompt_cache_size), group=group)
    try:
        scheduler.start()
    except (ValueError, OSError, RuntimeError) as e:
        sys.exit(runtime_error(f"{rank_prefix(group)}{e}"))
    if scheduler.follower:  # ranks other than 0: no HTTP; run rank 0's turns until it stops
        scheduler.thread.join()
        return
    app = create_app(scheduler, model_id=model_id, defaults=defaults, max_body_bytes=a.max_body_bytes)
    if not is_loopback(a.host):
        print(f"warning: listening on {a.host}: anyone who can reach this address can use the model "
              "(no authentication, no TLS)", file=sys.stderr)
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level, timeout_graceful_shutdown=2)
    scheduler.stop()


class _NoTokenizer:  # lets main() validate the defaults with parse_request before any model is loaded
    def get_vocab(self):
        return {0: 0}


if __name__ == "__main__":
    main()
