"""The OpenAI-compatible server (`nanovllm serve`): one engine, stepped by one background thread; every HTTP request
joins the running batch through add_request and leaves through release, so clients share steps (continuous
batching across clients, not one request at a time)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid

from fastapi import FastAPI, Request  # the serve extra; FastAPI reads the handlers' annotations from this module
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.background import BackgroundTask

from nanovllm.engine.llm_engine import LLMEngine, StepOutput
from nanovllm.errors import PromptTooLongError
from nanovllm.sampling_params import SamplingParams
from nanovllm.server_api import (
    APIError,
    chat_prompt,
    check_model,
    completion_prompts,
    finish_reason,
    prompt_only,
    sampling_params,
)
from nanovllm.server_logprobs import LogprobWriter, echo_logprobs, prompt_logprobs_of, records_of
from nanovllm.server_metrics import Metrics

log = logging.getLogger("nanovllm.server")


class EngineLoop:
    """Steps the engine in a background thread whenever requests are pending, and hands each request's step outputs
    to the asyncio queue of the HTTP handler that waits for them."""

    MAX_FAILED_STEPS = 3  # a step that keeps raising: its requests end with an error instead of looping forever

    def __init__(self, llm: LLMEngine):
        self.llm, self.metrics = llm, Metrics()
        self.queues: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.owners: dict[int, int] = {}  # a candidate the engine forked (best_of) -> the request it is of
        self.wake, self.stopping = threading.Event(), False
        self.thread = threading.Thread(target=self._run, name="nanovllm-engine", daemon=True)
        self.thread.start()

    def submit(self, prompt: str | list[int], params: SamplingParams) -> tuple[int, asyncio.Queue]:
        """Queue a request (validated: a bad one raises here); its outputs arrive on the returned queue."""
        queue: asyncio.Queue = asyncio.Queue()
        with self.llm.lock:  # registered before the stepping thread can produce its first output
            rid = self.llm.add_request(prompt, params)
            self.queues[rid] = (asyncio.get_running_loop(), queue)
            self.metrics.started(rid)
        self.wake.set()
        return rid, queue

    def release(self, rid: int) -> None:
        """Forget a request: aborted at once if it still runs (a client that went away), its blocks back in the pool."""
        with self.llm.lock:
            self.queues.pop(rid, None)
            for candidate in self.llm.groups.get(rid, [rid])[1:]:
                self.owners.pop(candidate, None)
            self.llm.release(rid)
        self.metrics.ended(rid)

    async def result(self, rid: int, queue: asyncio.Queue) -> dict:
        """Wait until a request has finished, every candidate of it; then its result (the engine's result(): with
        best_of, the n most likely under "outputs"), read before anyone releases it, plus "prompt_ids" and
        "completion_tokens" (over all its candidates: each was generated, returned or not)."""
        while True:
            out = await queue.get()
            if not out.finished:
                continue
            with self.llm.lock:
                if self.llm._done(rid):  # the engine's own test: every candidate forked and finished
                    members = [m for m in self.llm.groups.get(rid, [rid]) if m in self.llm.requests]
                    tokens = sum(len(self.llm.requests[m].output_ids) for m in members)
                    prompt = self.llm.requests[rid].prompt_ids
                    return {**self.llm.result(rid), "prompt_ids": prompt, "completion_tokens": tokens}

    def records(self, rid: int, start: int, count: int) -> list:
        """The logprob records of a request's output tokens start .. start + count (the engine's thread appends
        more as it steps: read under the lock, by position)."""
        with self.llm.lock:
            seq = self.llm.requests.get(rid)
            return list(seq.token_logprobs[start : start + count]) if seq is not None else []

    def _deliver(self, out: StepOutput) -> None:
        self.metrics.token(out)
        rid = out.request_id
        if rid not in self.queues and rid not in self.owners:  # a candidate forked this step: find its request
            with self.llm.lock:  # (none: a request released meanwhile, whose last outputs go nowhere)
                owner = next((r for r in self.queues if rid in self.llm.groups.get(r, ())), None)
                if owner is not None:
                    self.owners[rid] = owner
        entry = self.queues.get(self.owners.get(rid, rid))
        if entry is not None:
            loop, queue = entry
            loop.call_soon_threadsafe(queue.put_nowait, out)

    def _run(self) -> None:
        failures = 0
        while not self.stopping:
            if not self.llm.has_unfinished():
                self.wake.wait(0.05)
                self.wake.clear()
                continue
            try:
                outputs = self.llm.step()
                failures = 0
            except Exception as e:  # the engine is left consistent: the step's requests are simply run again
                failures += 1
                log.exception("engine step failed (%d in a row)", failures)
                if failures >= self.MAX_FAILED_STEPS:
                    self._fail_running(f"the engine failed {failures} steps in a row: {type(e).__name__}: {e}")
                continue
            for out in outputs:
                self._deliver(out)

    def _fail_running(self, why: str) -> None:
        with self.llm.lock:
            for rid in [s.request_id for s in (*self.llm.scheduler.running, *self.llm.scheduler.waiting)]:
                self.llm.abort(rid)
                self.llm.requests[rid].error = why
                self._deliver(StepOutput(rid, [], True, "error"))

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=5)


def create_app(llm: LLMEngine, model_name: str, api_key: str | None = None):
    """The FastAPI application serving `llm` under `model_name`."""
    engine = EngineLoop(llm)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        engine.stop()  # the stepping thread ends with the server

    app = FastAPI(title="nano-vLLM", version="0.1.0", lifespan=lifespan)
    app.state.engine = engine

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            return APIError(
                401, "invalid or missing API key (send Authorization: Bearer KEY)", "authentication_error"
            ).response()
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, e: Exception):  # a bug, not bad input: still OpenAI's shape, and
        return APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error").response()  # logged

    async def body_of(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        check_model(body, model_name)
        return body

    async def run(prompts: list, params: list[SamplingParams], chat: bool, body: dict):
        """Submit every (prompt, parameters) pair, then stream or collect their outputs."""
        submitted = []
        try:
            for prompt, p in zip(prompts, params):
                submitted.append(engine.submit(prompt, p))
        except (ValueError, TypeError) as e:
            for rid, _ in submitted:
                engine.release(rid)
            code = "context_length_exceeded" if isinstance(e, PromptTooLongError) else None
            fields = ("stop_token_ids", "logit_bias", "allowed_token_ids")  # their vocabulary check names them first
            param = next((f for f in fields if str(e).startswith(f)), None)
            raise APIError(400, str(e), param=param, code=code) from None
        created, rid0 = int(time.time()), f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        kind = "chat.completion" if chat else "text_completion"
        head = {"id": rid0, "object": kind, "created": created, "model": model_name}
        with llm.lock:
            prompt_ids = [llm.requests[rid].prompt_ids for rid, _ in submitted]
        prompt_tokens = sum(len(ids) for ids in prompt_ids)
        logprobs = params[0].logprobs is not None
        if body.get("stream"):
            writers = [LogprobWriter(llm.tokenizer, ids, chat) if logprobs else None for ids in prompt_ids]
            events = stream_events(engine, submitted, writers, head, chat, body, prompt_tokens)

            async def release_all():  # runs after the stream ends or the client leaves
                await events.aclose()  # a generator the client left at a yield: its finally runs now, not at GC
                for rid, _ in submitted:  # (one never started has no finally to run)
                    engine.release(rid)

            return StreamingResponse(events, media_type="text/event-stream", background=BackgroundTask(release_all))
        try:  # the queues fill meanwhile: waiting for one request after another costs nothing
            results = [await engine.result(rid, queue) for rid, queue in submitted]
        finally:
            for rid, _ in submitted:  # a request not waited to its end (an error, a disconnect) is aborted too
                engine.release(rid)
        choices, prompt_logprobs = [], None
        echo, scoring = bool(body.get("echo")), prompt_only(body)  # (checked with the sampling parameters)
        for prompt, result in zip(prompts, results):
            if body.get("prompt_logprobs") is not None:  # vLLM's extra (echo asks the engine for them too)
                prompt_logprobs = prompt_logprobs_of(llm.tokenizer, result["prompt_ids"], result)
            for r in result.get("outputs", [result]):  # best_of: the n most likely candidates, best first
                if r["finish_reason"] == "error":
                    raise APIError(500, "generation failed inside the engine", "server_error")
                kept = 0 if scoring else len(r["token_ids"])  # echo of the prompt alone: the one token made goes
                writer = LogprobWriter(llm.tokenizer, result["prompt_ids"], chat) if logprobs else None
                lp = writer.write(r["token_ids"][:kept], records_of(r)[:kept]) if writer else None
                text, reason = (r["text"], finish_reason(r["finish_reason"])) if not scoring else ("", "length")
                if echo:
                    echoed = prompt if isinstance(prompt, str) else llm.tokenizer.decode(result["prompt_ids"])
                    k = params[0].logprobs
                    lp = echo_logprobs(writer, result["prompt_ids"], result, lp, k, len(echoed)) if writer else None
                    text = echoed + text
                choice = {"index": len(choices), "logprobs": lp, "finish_reason": reason}
                choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
                if prompt_logprobs is not None and not chat:  # vLLM: on each completions choice
                    choice["prompt_logprobs"] = prompt_logprobs
                choices.append(choice)
        completion_tokens = 0 if scoring else sum(r["completion_tokens"] for r in results)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
        usage["total_tokens"] = prompt_tokens + completion_tokens
        extra = {"prompt_logprobs": prompt_logprobs} if chat and prompt_logprobs is not None else {}  # vLLM: top level
        return JSONResponse({**head, "choices": choices, "usage": usage, **extra})

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request)
        prompts = completion_prompts(body)
        params = sampling_params(body, chat=False)
        return await run([p for p in prompts for _ in params], params * len(prompts), False, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await body_of(request)
        prompt = chat_prompt(body, llm.tokenizer)
        params = sampling_params(body, chat=True)
        return await run([prompt] * len(params), params, True, body)

    @app.post("/tokenize")
    async def tokenize(request: Request):  # vLLM's: a prompt's token ids, counted before it is sent
        body = await body_of(request)
        if unknown := sorted(set(body) - {"model", "prompt", "messages"}):
            raise APIError(400, f"unknown fields {unknown}", param=unknown[0])
        if "messages" in body:  # rendered as /v1/chat/completions would: ids, or the plain fallback's text
            prompt = chat_prompt(body, llm.tokenizer)
        elif isinstance(body.get("prompt"), str):
            prompt = body["prompt"]
        else:
            raise APIError(400, "give prompt (a string) or messages", param="prompt")
        ids = prompt if isinstance(prompt, list) else llm.tokenizer.encode(prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": llm.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await body_of(request)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
            raise APIError(400, "tokens must be a list of token ids", param="tokens")
        if bad := [t for t in tokens if not 0 <= t < llm.config.vocab_size]:
            raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary [0, {llm.config.vocab_size})",
                           param="tokens")  # fmt: skip
        return {"prompt": llm.tokenizer.decode(tokens)}

    @app.get("/v1/models")
    async def models():
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "nanovllm"}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render(llm), media_type="text/plain; version=0.0.4")

    return app


async def stream_events(
    engine: EngineLoop, submitted, writers: list, head: dict, chat: bool, body: dict, prompt_tokens
):
    """Server-sent events: a chunk per step that made text (or tokens, when their ids or logprobs were asked for),
    a last chunk with each choice's finish reason, [DONE].

    If the client goes away, the generator is closed: its `finally` aborts and releases every request at once."""
    merged: asyncio.Queue = asyncio.Queue()
    index = {rid: i for i, (rid, _) in enumerate(submitted)}
    sent = [0] * len(submitted)  # output tokens already streamed, per choice: where its next logprobs start
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    token_ids = bool(body.get("return_token_ids"))  # nanovllm's extension: each chunk's new token ids too

    async def forward(queue: asyncio.Queue):
        while not (out := await queue.get()).finished:
            await merged.put(out)
        await merged.put(out)

    tasks = [asyncio.create_task(forward(q)) for _, q in submitted]
    kind = "chat.completion.chunk" if chat else "text_completion"
    completion_tokens, open_choices = 0, len(submitted)
    try:
        if chat:
            for i in range(len(submitted)):
                first = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}  # fmt: skip
                yield sse({**head, "object": kind, "choices": [first]})
        while open_choices:
            out = await merged.get()
            i, new = index[out.request_id], out.new_token_ids
            completion_tokens += len(new)
            if out.finish_reason == "error":
                yield sse({"error": {"message": "generation failed inside the engine", "type": "server_error"}})
            if out.text or out.finished or ((token_ids or writers[i]) and new):
                reason = finish_reason(out.finish_reason) if out.finished else None
                records = engine.records(out.request_id, sent[i], len(new)) if writers[i] else None
                choice = {"index": i, "logprobs": writers[i].write(new, records) if writers[i] else None}
                choice["finish_reason"] = reason
                choice |= {"delta": {"content": out.text}} if chat else {"text": out.text}
                if token_ids:
                    choice["token_ids"] = new
                yield sse({**head, "object": kind, "choices": [choice]})
            sent[i] += len(new)
            open_choices -= out.finished
        if include_usage:
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                     "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip
            yield sse({**head, "object": kind, "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"
    finally:
        for task in tasks:
            task.cancel()
        for rid, _ in submitted:
            engine.release(rid)


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def serve(llm: LLMEngine, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None):
    """Run the server until interrupted."""
    import uvicorn

    uvicorn.run(create_app(llm, model_name, api_key), host=host, port=port, log_level="info")
