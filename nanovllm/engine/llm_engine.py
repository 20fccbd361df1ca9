"""LLMEngine: add_request / step / abort, the loop a server drives; generate() is built on them."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.io import (
    Prompt,
    finish_reason,
    make_output,
    prepare_inputs,
    request_generator,
    stop_string_cut,
)
from nanovllm.engine.kv_cache import pool_for_model
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.layers.sampler import sample
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.loader import load_model
from nanovllm.utils.tokenizer import IncrementalDetokenizer


@dataclass
class StepOutput:
    request_id: int
    new_token_ids: list[int]  # produced this step (empty while a chunked prefill is still going)
    finished: bool
    finish_reason: str | None
    text: str = ""  # output text that became final this step: the pieces add up to output()["text"]


class LLMEngine:
    """Continuous batching over a paged KV pool: requests join and leave the running batch at every step."""

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
        gpu_memory_utilization: float = 0.9,
        enable_prefix_caching: bool = True,
        enable_chunked_prefill: bool = True,
        attention_backend: str = "auto",
    ):
        loaded = load_model(model, dtype=dtype, device=device)
        self.model, self.config, self.tokenizer = loaded.model, loaded.config, loaded.tokenizer
        cfg = self.config
        self.max_model_len = min(max_model_len or cfg.max_model_len, cfg.max_model_len)
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        # on CPU, by default, room for 16 sequences of the full context
        self.pool = pool_for_model(
            cfg,
            self.model.lm_head.weight.dtype,
            device,
            block_size,
            kv_cache_memory,
            gpu_memory_utilization,
            16 * self.max_model_len,
        )
        self.block_manager = BlockManager(self.pool.num_blocks, block_size, enable_prefix_caching)
        if not enable_chunked_prefill and max_num_batched_tokens < self.max_model_len:
            max_num_batched_tokens = self.max_model_len  # every prompt must fit one step
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens, enable_chunked_prefill)
        self.runner = ModelRunner(self.model, self.pool, attention_backend)
        self.requests: dict[int, Sequence] = {}
        self._ids = itertools.count()
        self.stats = {"steps": 0, "prefill_tokens": 0, "decode_tokens": 0, "preemptions": 0, "peak_running": 0}

    @property
    def kv_cache_bytes(self) -> int:
        return self.pool.nbytes

    # ---- the request-level API ---------------------------------------------------------------------------

    def add_request(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> int:
        """Queue one request; returns its id. Bad prompts and requests that can never fit fail here."""
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
        seq = Sequence(ids, params, generator=request_generator(params, self.generator), request_id=next(self._ids))
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, ids)
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq.request_id

    def abort(self, request_id: int) -> None:
        """Stop a request now: its blocks return to the pool at once; the others carry on undisturbed."""
        seq = self.requests.get(request_id)
        if seq is None or seq.is_finished:
            return
        self.scheduler.finish(seq, "abort")

    def release(self, request_id: int) -> None:
        """Forget a request (aborting it if it still runs): a server calls this once it has sent the result,
        so an engine that serves request after request does not keep them all."""
        self.abort(request_id)
        self.requests.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[StepOutput]:
        """One iteration: schedule, run the flattened batch, sample, retire finished requests."""
        batch = self.scheduler.schedule()
        self.stats["steps"] += 1
        self.stats["preemptions"] += len(batch.preempted)
        self.stats["peak_running"] = max(self.stats["peak_running"], len(self.scheduler.running))
        if not batch.seqs:
            if self.scheduler.waiting and not self.scheduler.running:  # check_fits promised every request fits
                raise RuntimeError("the scheduler could not admit a request into an empty engine")
            return []
        ready = [i for i, s in enumerate(batch.seqs) if s.num_computed_tokens == len(s)]  # reached the end
        logits = self.runner.run(batch.seqs, batch.num_tokens, ready)
        tokens = sample(logits, [batch.seqs[i] for i in ready], self.tokenizer.eos_token_ids) if ready else []
        decode = sum(1 for n, s in zip(batch.num_tokens, batch.seqs) if n == 1 and len(s) > s.num_prompt_tokens)
        self.stats["decode_tokens"] += decode
        self.stats["prefill_tokens"] += sum(batch.num_tokens) - decode
        outputs = []
        for i, token in zip(ready, tokens):
            seq = batch.seqs[i]
            seq.token_ids.append(token)
            reason = finish_reason(
                seq.output_ids, seq.params, self.tokenizer.eos_token_ids, len(seq), self.max_model_len
            )
            detok = seq.detokenizer
            new_text = detok.add([token])  # decodes a few tokens, not the whole output
            # a stop string outranks the length limit (the last allowed token may complete it), not min_tokens
            p = seq.params
            if p.stop and reason != "stop" and len(seq.output_ids) >= p.min_tokens:
                searched = len(detok.text) - len(new_text)  # earlier steps searched the text before this token's
                cut = stop_string_cut(detok.text, p.stop, p.include_stop_str_in_output, searched)
                if cut is not None:
                    seq.text_end, reason = cut, "stop"
            if reason is not None:
                self.scheduler.finish(seq, reason)
                detok.flush()
            outputs.append(StepOutput(seq.request_id, [token], reason is not None, reason, self._new_text(seq)))
        return outputs

    @staticmethod
    def _new_text(seq: Sequence) -> str:
        """The output text that became final since the last step. While a request runs, text that may be the
        start of a stop string is held back: a stop string never reaches the caller unless asked for."""
        text = seq.detokenizer.text
        if seq.is_finished:
            end = len(text) if seq.text_end is None else seq.text_end
        else:
            end = len(text) - max((len(s) - 1 for s in seq.params.stop), default=0)
        if end <= seq.text_sent:
            return ""
        new, seq.text_sent = text[seq.text_sent : end], end
        return new

    def output(self, request_id: int) -> dict:
        """The result of a request so far: text, generated token ids, finish reason."""
        seq = self.requests.get(request_id)
        if seq is None:
            raise KeyError(f"no request {request_id}: unknown, or released")
        return make_output(self.tokenizer, seq.prompt_ids, seq.output_ids, seq.finish_reason, seq.text_end)

    # ---- the batch API every chapter shares --------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[dict]:
        ids = [self._add(p, sp) for p, sp in self._checked(prompts, sampling_params)]
        mine = set(ids)
        bar = tqdm(total=len(ids), desc="generate", disable=not use_tqdm)
        start = time.perf_counter()
        prefill0, decode0 = self.stats["prefill_tokens"], self.stats["decode_tokens"]
        try:
            while self.has_unfinished():
                finished = sum(o.finished for o in self.step() if o.request_id in mine)
                if finished and use_tqdm:
                    elapsed = time.perf_counter() - start
                    bar.set_postfix(
                        prefill=f"{(self.stats['prefill_tokens'] - prefill0) / elapsed:.0f} tok/s",
                        decode=f"{(self.stats['decode_tokens'] - decode0) / elapsed:.0f} tok/s",
                    )
                    bar.update(finished)
        finally:
            bar.close()
        outputs = [self.output(i) for i in ids]
        for i in ids:
            self.release(i)
        return outputs
