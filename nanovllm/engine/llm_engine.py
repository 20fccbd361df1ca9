"""LLMEngine: add_request / step / abort, the loop a server drives; generate() is built on them."""

from __future__ import annotations

import atexit
import itertools
import threading
import time
import weakref
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from nanovllm.engine.beam_search import BeamSearchParams, beam_search
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.candidates import Row, best_of, candidate_rows, record_logprob, record_prompt_logprobs
from nanovllm.engine.io import (
    Prompt,
    check_engine_args,
    check_prompt,
    context_length,
    prepare_inputs,
    request_generator,
)
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.output_processor import OutputProcessor
from nanovllm.engine.scheduler import ScheduledBatch, Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.tensor_parallel import (
    ShardSpec,
    TensorParallelRunner,
    build_shard,
    threads_per_rank,
)
from nanovllm.engine.tensor_parallel import start as start_tensor_parallel
from nanovllm.layers.paged_attention import BACKENDS
from nanovllm.layers.quantization import weight_bytes
from nanovllm.layers.sampler import SamplingBatch, sample
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.loader import check_splits, model_path


@dataclass
class StepOutput:
    request_id: int
    new_token_ids: list[int]  # produced this step (empty while a chunked prefill is still going)
    finished: bool
    finish_reason: str | None  # 'stop', 'length', 'abort' or 'error'
    text: str = ""  # output text that became final this step: the pieces add up to output()["text"]


class LLMEngine:
    """Continuous batching over a paged KV pool: requests join and leave the running batch at every step.

    Thread-safe: one thread may step while others add, abort and release requests (a lock guards the queues;
    a step holds it from scheduling to the last output).
    """

    attention_backends: tuple[str, ...] = tuple(BACKENDS)  # a chapter snapshot pins its own

    def __init__(
        self,
        model: str = "default",
        dtype: str | torch.dtype | None = None,
        device: str = "cpu",
        max_model_len: int | None = None,
        seed: int = 0,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 512,
        block_size: int = 16,
        kv_cache_memory: int | None = None,
        kv_cache_dtype: str = "auto",
        gpu_memory_utilization: float = 0.9,
        enable_prefix_caching: bool = True,
        enable_chunked_prefill: bool = True,
        attention_backend: str = "auto",
        enforce_eager: bool | None = None,
        fuse_projections: bool = True,
        linear_kernel: str | None = None,
        quantization: str | None = None,
        quantize_lm_head: bool = True,
        tensor_parallel_size: int = 1,
    ):
        """Chapter 6's options. enforce_eager=False runs decode-only steps from static buffers padded to a bucket:
        CUDA graphs on a GPU, an eager replay on a CPU (what the tests check; on a CPU it buys nothing, so None,
        the default, means graphs on a GPU and plain eager steps on a CPU); True runs every step eagerly.
        fuse_projections concatenates q/k/v and gate/up weights at load time (fewer, bigger matmuls).
        linear_kernel 'c' multiplies float32 weights by up to LINEAR_KERNEL_MAX_ROWS rows (decode steps) in a C
        kernel on the CPU (nanovllm/kernels/linear_cpu.c), 'torch' always in PyTorch; None: 'c' where it can run.

        Chapter 7's: quantization None (full precision), 'int8' (per output channel) or 'int4' (groups of 32 inputs;
        'int4-g64', 'int4-g128' for bigger groups), applied at load time to every linear layer of the decoder, and to
        the output layer unless quantize_lm_head=False. Embeddings and norms stay in full precision.

        kv_cache_dtype 'bfloat16' keeps K and V in 16 bits (half the bytes a batched decode step reads from its cache;
        on a CPU the C attention kernel and the replayed step read it, the arithmetic stays float32); 'auto' keeps
        them in the model's dtype.

        Beyond one device: tensor_parallel_size=N shards every layer over N processes (this one is rank 0; it
        spawns the others, gloo on the CPU, NCCL on GPUs cuda:0..N-1), each with its share of the heads, the MLP
        and the vocabulary, and its own KV pool (engine/tensor_parallel.py). Steps run eagerly then. Call
        shutdown() (or use the engine as a context manager) to stop the workers before the process ends."""
        check_engine_args(
            dtype=dtype,
            device=device,
            max_model_len=max_model_len,
            seed=seed,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            block_size=block_size,
            kv_cache_memory=kv_cache_memory,
            kv_cache_dtype=kv_cache_dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=enable_prefix_caching,
            enable_chunked_prefill=enable_chunked_prefill,
            attention_backend=attention_backend,
            enforce_eager=enforce_eager,
            fuse_projections=fuse_projections,
            linear_kernel=linear_kernel,
            quantization=quantization,
            quantize_lm_head=quantize_lm_head,
            tensor_parallel_size=tensor_parallel_size,
        )
        model = model_path(model)  # a hub id is fetched here, once: every rank then reads the same local folder
        load = dict(dtype=dtype, device=device, fuse_projections=fuse_projections, quantization=quantization)
        load["quantize_lm_head"] = quantize_lm_head
        pool = dict(block_size=block_size, kv_cache_memory=kv_cache_memory, max_model_len=max_model_len)
        pool["gpu_memory_utilization"], pool["kv_cache_dtype"] = gpu_memory_utilization, kv_cache_dtype
        spec = ShardSpec(model, load, linear_kernel, pool, attention_backend, self.attention_backends)
        spec.threads = threads_per_rank(tensor_parallel_size, device)  # on the CPU the ranks share the cores
        if tensor_parallel_size > 1:
            check_splits(model, tensor_parallel_size)  # a missing or unsplittable model: no worker is started for it
        self.tensor_parallel = start_tensor_parallel(tensor_parallel_size, spec) if tensor_parallel_size > 1 else None
        try:
            loaded, self.linear_kernel, self.pool = build_shard(spec, self.tensor_parallel and self.tensor_parallel[0])
        except BaseException:
            for proc in self.tensor_parallel[1] if self.tensor_parallel else []:
                proc.terminate()
            raise
        self.quantization = quantization
        self.model, self.config, self.tokenizer = loaded.model, loaded.config, loaded.tokenizer
        self.max_model_len = context_length(self.config.max_model_len, max_model_len)
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.block_manager = BlockManager(self.pool.num_blocks, block_size, enable_prefix_caching)
        if not enable_chunked_prefill and max_num_batched_tokens < self.max_model_len:
            max_num_batched_tokens = self.max_model_len  # every prompt must fit one step
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens, enable_chunked_prefill)
        if enforce_eager is None:
            enforce_eager = torch.device(device).type != "cuda"
        graphs = None if enforce_eager else (max_num_seqs, self.max_model_len)
        if self.tensor_parallel:
            group, workers = self.tensor_parallel
            group.seconds = 0.0  # from here on: the steps' collectives, not the start's
            self.runner = TensorParallelRunner(
                self.model, self.pool, group, workers, attention_backend, self.attention_backends, spec.threads
            )
            # the workers stop with this process if nobody called shutdown() (a weak reference: the engine can go)
            atexit.register(_shutdown_at_exit, weakref.ref(self.runner))
        else:
            self.runner = ModelRunner(self.model, self.pool, attention_backend, self.attention_backends, graphs)
        self.requests: dict[int, Sequence] = {}
        self.outputs: dict[int, OutputProcessor] = {}
        self.groups: dict[int, list[int]] = {}  # a request -> its candidates (itself first; n or best_of > 1)
        self.undelivered: list[StepOutput] = []  # other requests' outputs from steps that generate() ran
        self.lock = threading.RLock()
        self._ids = itertools.count()
        self.stats = {"steps": 0, "prefill_tokens": 0, "decode_tokens": 0, "preemptions": 0, "peak_running": 0}

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (idempotent; an engine on one process has nothing to stop)."""
        if self.tensor_parallel:
            self.runner.shutdown()

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    @property
    def kv_cache_bytes(self) -> int:
        return self.pool.nbytes

    @property
    def weight_bytes(self) -> int:
        """Bytes of the model's weights as stored (quantized ones at their quantized size)."""
        return weight_bytes(self.model)

    # ---- the request-level API ---------------------------------------------------------------------------

    def add_request(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> int:
        """Queue one request; returns its id. Bad prompts and requests that can never fit fail here."""
        check_prompt(prompt)
        [(ids, params)] = self._checked([prompt], sampling_params)
        return self._add(ids, params)

    def _checked(
        self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None
    ) -> list[tuple[list[int], SamplingParams]]:
        """Every request validated (prompt, parameters, room in the pool) before any of them is queued."""
        inputs = prepare_inputs(self.tokenizer, prompts, sampling_params, self.max_model_len, self.config.vocab_size)
        for ids, params in inputs:
            self.block_manager.check_fits(len(ids), params.max_tokens, self.max_model_len)
        return inputs

    def _add(self, ids: list[int], params: SamplingParams) -> int:
        with self.lock:
            seq = Sequence(ids, params, generator=request_generator(params, self.generator))
            seq.request_id, seq.forks_left = next(self._ids), params.candidates - 1
            if params.prompt_logprobs is not None:  # the first prompt token has none: nothing comes before it
                seq.prompt_logprobs = [None]
            self.groups[seq.request_id] = [seq.request_id]
            eos = self.tokenizer.eos_token_ids
            self.outputs[seq.request_id] = OutputProcessor(self.tokenizer, ids, params, eos, self.max_model_len)
            self.requests[seq.request_id] = seq
            self.scheduler.add(seq)
            return seq.request_id

    def fork(self, request_id: int, sampling_params: SamplingParams | None = None) -> int:
        """A new request that goes on from this one's tokens (so far), sharing its KV blocks: the first write into
        a shared, partly filled block copies it (copy on write). Parallel sampling and beam search build on it."""
        with self.lock:
            parent = self.requests.get(request_id)
            if parent is None or parent.is_finished:
                raise ValueError(f"request {request_id} cannot be forked: unknown, released or finished")
            params = sampling_params or parent.params
            return self._spawn(parent, params, request_generator(params, self.generator)).request_id

    def _spawn(self, parent: Sequence, params: SamplingParams, generator: torch.Generator) -> Sequence:
        child = Sequence(parent.token_ids, params, num_prompt_tokens=parent.num_prompt_tokens, generator=generator)
        child.request_id, child.cumulative_logprob = next(self._ids), parent.cumulative_logprob
        child.token_logprobs = list(parent.token_logprobs)
        out = OutputProcessor(
            self.tokenizer, parent.prompt_ids, params, self.tokenizer.eos_token_ids, self.max_model_len
        )
        if parent.output_ids:
            out.detokenizer.add(parent.output_ids)  # its text so far is the parent's
        self.outputs[child.request_id], self.requests[child.request_id] = out, child
        self.groups.get(parent.request_id, []).append(child.request_id)  # released and aborted with its first
        self.scheduler.fork(parent, child)
        return child

    def abort(self, request_id: int) -> None:
        """Stop a request now: its blocks return to the pool at once; the others carry on undisturbed."""
        with self.lock:
            for member in self.groups.get(request_id, [request_id]):  # a request with n > 1: all its candidates
                seq = self.requests.get(member)
                if seq is not None and not seq.is_finished:
                    self._finish(seq, "abort")

    def release(self, request_id: int) -> None:
        """Forget a request (aborting it if it still runs): a server calls this once it has sent the result,
        so an engine that serves request after request does not keep them all."""
        with self.lock:
            self.abort(request_id)
            for member in self.groups.pop(request_id, [request_id]):
                self.requests.pop(member, None)
                self.outputs.pop(member, None)

    def has_unfinished(self) -> bool:
        with self.lock:
            return self.scheduler.has_unfinished()

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        self.outputs[seq.request_id].finish(reason)

    def step(self) -> list[StepOutput]:
        """One iteration: schedule, run the flattened batch, sample, retire finished requests.

        If the forward pass raises, nothing was counted: the exception propagates and the next step runs the
        same requests again from where they were. A request whose sampling raises finishes with 'error'
        (output()["error"] says why); the others in its step go on as if it had not been there.
        """
        with self.lock:
            outputs, self.undelivered = self.undelivered, []
            return outputs + self._step()

    def _step(self) -> list[StepOutput]:
        plan = self.scheduler.schedule()
        self.stats["steps"] += 1
        self.stats["preemptions"] += len(plan.preempted)
        self.stats["peak_running"] = max(self.stats["peak_running"], len(self.scheduler.running))
        if not plan.seqs:
            if self.scheduler.waiting and not self.scheduler.running:  # check_fits promised every request fits
                raise RuntimeError("the scheduler could not admit a request into an empty engine")
            return []
        # a sequence samples once this step's tokens reach its end (a chunked prefill part-way does not)
        ready = [i for i, (s, n) in enumerate(zip(plan.seqs, plan.num_tokens)) if s.num_computed_tokens + n == len(s)]
        every = [i for i, s in enumerate(plan.seqs) if s.wants_prompt_logits]  # prompt_logprobs: every position
        logits, prompt_logits = self.runner.run(plan.seqs, plan.num_tokens, ready, plan.copies, every)
        for i, chunk in prompt_logits.items():
            record_prompt_logprobs(plan.seqs[i], plan.seqs[i].num_computed_tokens, chunk)
        rows = candidate_rows([plan.seqs[i] for i in ready], self.generator)
        if len(rows) > len(ready):  # a prompt just computed draws for each of its candidates from its logits
            logits = logits[[r.logits_row for r in rows]]
        tokens = self._sample(logits, rows)
        return self._postprocess(plan, rows, tokens, logits)

    def _sample(self, logits: torch.Tensor, rows: list[Row]) -> list[int | str]:
        """One token per row, or the error its sampling raised (as text); one bad row spoils no other.

        The random streams are restored before a retry row by row (and on an interrupt), so a seeded request
        draws exactly what it would have drawn had nothing gone wrong.
        """
        generators = list({id(r.generator): r.generator for r in rows if not r.seq.params.greedy}.values())
        states = [g.get_state() for g in generators]

        def batch(rows: list[Row]) -> SamplingBatch:
            return SamplingBatch.build(
                [r.seq.params for r in rows],
                [r.seq.token_ids for r in rows],
                [r.seq.num_prompt_tokens for r in rows],
                self.tokenizer.eos_token_ids,
                self.config.vocab_size,
                [r.generator for r in rows],
                logits.device,
            )

        try:
            return sample(logits, batch(rows))
        except BaseException as e:
            for g, state in zip(generators, states):
                g.set_state(state)
            if not isinstance(e, Exception):  # an interrupt: the streams are as they were; let it through
                raise
        tokens: list[int | str] = []
        for i, row in enumerate(rows):
            try:
                tokens += sample(logits[i : i + 1], batch([row]))
            except Exception as e:
                tokens.append(f"sampling failed: {type(e).__name__}: {e}")
        return tokens

    def _postprocess(
        self, plan: ScheduledBatch, rows: list[Row], tokens: list[int | str], logits: torch.Tensor
    ) -> list[StepOutput]:
        """The step's second phase: count what the forward computed, append the sampled tokens, finish requests."""
        self.scheduler.postprocess(plan)
        decode = sum(1 for n, s in zip(plan.num_tokens, plan.seqs) if n == 1 and len(s) > s.num_prompt_tokens)
        self.stats["decode_tokens"] += decode
        self.stats["prefill_tokens"] += sum(plan.num_tokens) - decode
        # new candidates first: they share the prompt's blocks, before the first one's own token is appended
        seqs = [self._spawn(r.seq, r.seq.params, r.generator) if r.new else r.seq for r in rows]
        for r in rows:
            r.seq.forks_left = 0
        wanted = [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None or seq.params.candidates > 1]
        logprobs = dict(zip(wanted, logits[wanted].float().log_softmax(-1))) if wanted else {}
        outputs = []
        for i, (seq, token) in enumerate(zip(seqs, tokens)):
            out = self.outputs[seq.request_id]
            if isinstance(token, str):  # its sampling raised
                seq.error = token
                self._finish(seq, "error")
                outputs.append(StepOutput(seq.request_id, [], True, "error", out.take_new_text()))
                continue
            seq.token_ids.append(token)
            if i in logprobs:  # the model's own (before bias, penalties, temperature, filters): vLLM's raw_logprobs
                record_logprob(seq, token, logprobs[i])
            reason = out.append(seq.output_ids)
            if reason is not None:
                self._finish(seq, reason)
            outputs.append(StepOutput(seq.request_id, [token], reason is not None, reason, out.take_new_text()))
        return outputs

    def output(self, request_id: int) -> dict:
        """The result of a request so far: text, generated token ids, finish reason (and the error, if any)."""
        with self.lock:
            seq = self.requests.get(request_id)
            if seq is None:
                raise KeyError(f"no request {request_id}: unknown, or released")
            result = {
                "text": self.outputs[request_id].text,
                "token_ids": seq.output_ids,
                "finish_reason": seq.finish_reason,
            }
            if seq.error is not None:
                result["error"] = seq.error
            if seq.params.logprobs is not None or seq.params.candidates > 1:
                result["cumulative_logprob"] = seq.cumulative_logprob
            if seq.params.logprobs is not None:
                result["logprobs"] = [{"logprob": lp, "top": top} for lp, top in seq.token_logprobs]
            if seq.prompt_logprobs is not None:  # the request's first sequence holds them (not its candidates)
                records = seq.prompt_logprobs[1:]
                result["prompt_logprobs"] = [None] + [{"logprob": lp, "top": top} for lp, top in records]
            return result

    def result(self, request_id: int) -> dict:
        """A request's result; with n or best_of > 1, its best candidate's, with every returned one under "outputs"
        (the n most likely, best first)."""
        with self.lock:
            seq = self.requests.get(request_id)
            if seq is None or seq.params.candidates == 1:  # (output() names an unknown one)
                return self.output(request_id)
            results = [self.output(m) for m in self.groups.get(request_id, [request_id]) if m in self.requests]
            chosen = best_of(results, seq.params.n)
            shared = {"prompt_logprobs": results[0]["prompt_logprobs"]} if "prompt_logprobs" in results[0] else {}
            return {**chosen[0], **shared, "outputs": chosen}

    def _done(self, request_id: int) -> bool:
        """Finished, with every candidate (or aborted or released by another thread)."""
        seq = self.requests.get(request_id)
        if seq is None or (seq.is_finished and seq.forks_left):  # it ended before its candidates were forked
            return True
        return all(
            self.requests[m].is_finished for m in self.groups.get(request_id, [request_id]) if m in self.requests
        )

    def beam_search(self, prompts: Prompt | Seq[Prompt], params: BeamSearchParams) -> list[dict]:
        """Beam search over each prompt, with vLLM's semantics; beams share KV blocks by forking. One result per
        prompt, in order: the best sequence, with all beam_width of them under "outputs" (engine/beam_search.py)."""
        return beam_search(self, prompts, params)

    # ---- the batch API every chapter shares --------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[dict]:
        """Run these prompts to the end and return their results, in order.

        Requests queued with add_request keep running alongside, but their step outputs are kept for the next
        step() call, not dropped. Whatever happens (an exception, Ctrl-C), generate's own requests are aborted
        and released before it returns or raises: nothing of them is left in the engine.
        """
        ids = [self._add(p, sp) for p, sp in self._checked(prompts, sampling_params)]
        pending = set(ids)
        bar = tqdm(total=len(ids), desc="generate", disable=not use_tqdm)
        start = time.perf_counter()
        prefill0, decode0 = self.stats["prefill_tokens"], self.stats["decode_tokens"]
        try:
            while pending:
                with self.lock:
                    outs = self._step()
                    members = {m for i in pending for m in self.groups.get(i, [i])}
                    self.undelivered += [o for o in outs if o.request_id not in members]
                    finished = [i for i in pending if self._done(i)]
                pending.difference_update(finished)
                if finished and use_tqdm:
                    elapsed = time.perf_counter() - start
                    bar.set_postfix(
                        prefill=f"{(self.stats['prefill_tokens'] - prefill0) / elapsed:.0f} tok/s",
                        decode=f"{(self.stats['decode_tokens'] - decode0) / elapsed:.0f} tok/s",
                    )
                    bar.update(len(finished))
            with self.lock:
                return [self.result(i) if i in self.requests else _released(i) for i in ids]
        finally:
            bar.close()
            for i in ids:
                self.release(i)


def _shutdown_at_exit(runner: weakref.ref) -> None:
    if runner() is not None:
        runner().shutdown()


def _released(request_id: int) -> dict:
    """What generate returns for one of its requests that another thread released while it ran."""
    return {"text": "", "token_ids": [], "finish_reason": "abort"}
