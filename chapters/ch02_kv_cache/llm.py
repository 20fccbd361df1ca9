"""Chapter 2's engine: prefill each static batch once, then decode one token per step, reading the KV cache."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from chapters.ch01_naive.llm import LLM as Chapter1LLM
from chapters.ch01_naive.llm import sample_token
from chapters.ch02_kv_cache.kv_cache import ContiguousKVCache
from nanovllm.engine.io import Prompt, check_engine_args, finish_reason, make_output
from nanovllm.engine.kv_cache import KVPool
from nanovllm.models import DecoderForCausalLM
from nanovllm.sampling_params import SamplingParams


def right_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack prompts of different lengths into one batch, padding each on the right.

    Args:
        prompts: B lists of token ids.
        pad_id: the id written into padding (any valid id: padding is never attended to).
    Returns:
        ids (B, T) with T the longest prompt; positions (B, T) = 0 .. T-1 in every row
        (a padding token's position is its slot, which a later decode step overwrites);
        lengths (B,) the real length of each prompt.
    """
    T = max(len(p) for p in prompts)
    ids = torch.tensor([p + [pad_id] * (T - len(p)) for p in prompts])  # (B, T)
    positions = torch.arange(T).expand(len(prompts), T)  # (B, T)
    lengths = torch.tensor([len(p) for p in prompts])  # (B,)
    return ids, positions, lengths


@torch.inference_mode()
def generate_batch(
    model: DecoderForCausalLM,
    prompts: list[list[int]],
    params: list[SamplingParams],
    eos_ids: Sequence[int],
    max_model_len: int,
    generators: list[torch.Generator],
    cache: ContiguousKVCache,
) -> list[tuple[list[int], str]]:
    """Generate a static batch: one prefill over the padded prompts, then one decode step per token.

    Prefill: right_pad the prompts, cache.begin_step(positions), run the model once, and
    sample each row's first token from the logits at its last real position (lengths - 1).
    Decode: feed each row's newest token at its next position (B, 1); the cache supplies the
    past. A finished row keeps riding along (static batching) but its tokens are not kept; the
    batch ends when every row has a finish_reason.

    Args:
        model: the decoder; model(ids, positions, cache) -> hidden states.
        prompts: B prompts (token ids).
        params: one SamplingParams per prompt.
        eos_ids: end-of-sequence ids.
        max_model_len: the context length.
        generators: one random stream per prompt.
        cache: a ContiguousKVCache with at least B rows.
    Returns:
        B pairs (generated token ids, finish reason), in prompt order.
    """
    device = cache.k.device
    ids, positions, lengths = right_pad(prompts)
    cache.begin_step(positions.to(device))
    hidden = model(ids.to(device), positions.to(device), cache)  # (B, T, E)
    logits = model.compute_logits(hidden[torch.arange(len(prompts)), lengths - 1])  # (B, V)
    outputs: list[list[int]] = [[] for _ in prompts]
    reasons: list[str | None] = [None] * len(prompts)
    next_pos = lengths.clone()  # (B,): where each row's next token goes
    while True:
        step_tokens = []
        for b, row_logits in enumerate(logits):
            if reasons[b] is None:
                token = sample_token(row_logits, params[b].temperature, generators[b])
                outputs[b].append(token)
                reasons[b] = finish_reason(
                    outputs[b], params[b], eos_ids, len(prompts[b]) + len(outputs[b]), max_model_len
                )
                if reasons[b] is not None:
                    next_pos[b] -= 1  # a finished row rewrites its own last slot, staying inside the cache
            step_tokens.append(outputs[b][-1])
        if all(r is not None for r in reasons):
            return [(out, reason) for out, reason in zip(outputs, reasons)]
        positions = next_pos[:, None].to(device)  # (B, 1)
        cache.begin_step(positions)
        hidden = model(torch.tensor(step_tokens, device=device)[:, None], positions, cache)  # (B, 1, E)
        logits = model.compute_logits(hidden[:, 0])  # (B, V)
        next_pos += torch.tensor([r is None for r in reasons])


class LLM(Chapter1LLM):
    """Chapter 2's engine: prompts run in static batches of `rows`, each row reserving max_model_len cache slots."""

    chapter = "chapter 2"

    def __init__(
        self,
        model: str,
        dtype: str | torch.dtype | None = None,
        device: str = "cpu",
        max_model_len: int | None = None,
        seed: int = 0,
        max_num_seqs: int = 16,
        kv_cache_memory: int | None = None,
    ):
        check_engine_args(max_num_seqs=max_num_seqs, kv_cache_memory=kv_cache_memory)
        super().__init__(model, dtype, device, max_model_len, seed)
        cfg, torch_dtype = self.config, self.model.lm_head.weight.dtype
        per_row = self.max_model_len * KVPool.bytes_per_block(
            cfg.num_layers, 1, cfg.num_kv_heads, cfg.head_dim, torch_dtype
        )
        # A contiguous row must hold the longest possible sequence: the budget buys whole rows.
        rows = max_num_seqs if kv_cache_memory is None else min(max_num_seqs, kv_cache_memory // per_row)
        if rows < 1:
            raise ValueError(
                f"kv_cache_memory={kv_cache_memory} bytes holds no sequence: one row of "
                f"{self.max_model_len} tokens needs {per_row} bytes"
            )
        self.cache = ContiguousKVCache(
            cfg.num_layers, rows, self.max_model_len, cfg.num_kv_heads, cfg.head_dim, torch_dtype, device
        )

    @property
    def kv_cache_bytes(self) -> int:
        return self.cache.nbytes

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[dict]:
        inputs = self.prepare(prompts, sampling_params)
        outputs = []
        rows = self.cache.k.shape[1]
        bar = tqdm(total=len(inputs), desc="generate", disable=not use_tqdm)
        for first in range(0, len(inputs), rows):
            batch = inputs[first : first + rows]
            results = generate_batch(
                self.model,
                [ids for ids, _ in batch],
                [p for _, p in batch],
                self.tokenizer.eos_token_ids,
                self.max_model_len,
                [self.generator_for(p) for _, p in batch],
                self.cache,
            )
            for (prompt, _), (tokens, reason) in zip(batch, results):
                outputs.append(make_output(self.tokenizer, prompt, tokens, reason))
            bar.update(len(batch))
        bar.close()
        return outputs
