"""Benchmark engine `serve`: the final engine behind `nanovllm serve`, measured through its HTTP API.

The server runs in this process on a free loopback port; every request of a round is sent at once by its own
client (an asyncio task, streaming), so the server batches them as it would real clients. TTFT and TPOT are the
clients' own clocks, so the engine's figures against `ch07` (the same engine, offline) measure what HTTP, JSON and
the server's threads cost.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from benchmarks.engines import Engine, EngineUnavailable, RunResult
from benchmarks.models import ResolvedModel
from benchmarks.workloads import Request


class ServerEngine(Engine):
    name, kind, streams = "serve", "server", True

    def __init__(self, model: ResolvedModel, device: str, dtype: str, shared: dict | None = None, **options: Any):
        try:
            import httpx  # noqa: F401
            import uvicorn

            from nanovllm import LLM
            from nanovllm.server import create_app
        except ImportError as e:
            raise EngineUnavailable(f"serve: the server needs the serve extra (fastapi, uvicorn, httpx): {e}") from e
        accepted = {"max_model_len", "kv_cache_memory"}
        settings = {k: v for k, v in (shared or {}).items() if k in accepted and v is not None}
        self.options = {**settings, **options}
        self.llm = LLM(str(model.path), dtype=dtype, device=device, seed=0, **self.options)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(create_app(self.llm, "bench"), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise EngineUnavailable("serve: the server did not start")
            time.sleep(0.02)

    def run(self, requests: list[Request]) -> RunResult:
        return asyncio.run(self._run(requests))

    async def _run(self, requests: list[Request]) -> RunResult:
        def body(r: Request) -> dict:
            return {"prompt": r.prompt, "max_tokens": r.max_tokens, "temperature": 0, "ignore_eos": True,
                    "stream": True, "return_token_ids": True}  # fmt: skip

        def new_tokens(chunk: dict) -> list[int]:
            return [t for c in chunk["choices"] for t in c.get("token_ids", [])]

        return await stream_all(f"http://127.0.0.1:{self.port}/v1/completions", requests, body, new_tokens, "serve")

    def kv_cache_bytes(self, requests: list[Request]) -> int | None:
        return self.llm.kv_cache_bytes

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind, "options": self.options, "url": f"http://127.0.0.1:{self.port}"}

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


async def stream_all(
    url: str,
    requests: list[Request],
    body: Callable[[Request], dict],
    new_tokens: Callable[[dict], list[int]],
    who: str,
) -> RunResult:
    """Send every request at once, each by its own streaming client (server-sent events), and time them by the
    clients' clocks: `body(request)` is the JSON posted, `new_tokens(chunk)` the token ids an event carries."""
    import httpx

    tokens: list[list[int]] = [[] for _ in requests]
    first, last = [0.0] * len(requests), [0.0] * len(requests)

    async def client(i: int, r: Request, http) -> None:
        async with http.stream("POST", url, json=body(r)) as response:
            if response.status_code != 200:
                raise RuntimeError(f"{who}: request {i} answered {response.status_code}: {await response.aread()}")
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    new = new_tokens(json.loads(line[6:]))
                    if new:
                        now = time.perf_counter()
                        first[i] = first[i] or now
                        last[i] = now
                        tokens[i] += new

    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=len(requests) + 8)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as http:
        await asyncio.gather(*(client(i, r, http) for i, r in enumerate(requests)))
    wall = time.perf_counter() - t0
    ttft = [f - t0 for f in first]
    tpot = [(la - f) / (len(t) - 1) if len(t) > 1 else 0.0 for f, la, t in zip(first, last, tokens)]
    return RunResult(wall, tokens, ttft, tpot)
