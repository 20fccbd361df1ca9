"""The sampler: per-request allowed tokens and logit bias, penalties, temperature, top-k, top-p, min-p, then a draw
from each request's stream."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanovllm.sampling_params import SamplingParams


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's k largest logits; set the rest to -inf. A row with k <= 0 keeps everything.

    The k-th largest value of row b is the threshold: logits below it are removed (a tie at
    the threshold keeps every tied token).

    Args:
        logits: (B, V) float logits.
        top_k: (B,) integer k per row.
    Returns:
        (B, V) logits with the removed entries at -inf.
    """
    V = logits.shape[-1]
    k = torch.where(top_k <= 0, V, top_k.clamp(max=V))  # (B,)
    kth = logits.sort(dim=-1, descending=True).values.gather(-1, (k - 1)[:, None])  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability reaches top_p.

    Sort probabilities in descending order; a token is kept when the probability mass of the
    tokens strictly before it is still below top_p. So the token that crosses the threshold is
    kept, and the most likely token always survives. top_p = 1 keeps everything.

    Args:
        logits: (B, V) float logits (after temperature and top-k).
        top_p: (B,) in (0, 1].
    Returns:
        (B, V) logits with the removed entries at -inf.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (B, V)
    # top_p = 1 keeps all: in float32 the running sum of a peaked distribution can reach 1.0 before the end
    remove_sorted = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens less likely than min_p times the most likely token of their row. min_p = 0 keeps all.

    Args:
        logits: (B, V) float logits.
        min_p: (B,) in [0, 1].
    Returns:
        (B, V) logits with the removed entries at -inf.
    """
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, float("-inf"))


@dataclass
class SamplingBatch:
    """One step's sampling parameters as tensors, one row per request that samples: gathered once per step.

    Filters and penalties that no row uses stay None, so a greedy batch pays for none of them.
    """

    greedy: list[bool]
    temperature: torch.Tensor  # (B,) 1.0 on greedy rows
    generators: list[torch.Generator | None]
    top_k: torch.Tensor | None = None  # (B,)
    top_p: torch.Tensor | None = None  # (B,)
    min_p: torch.Tensor | None = None  # (B,)
    repetition_penalty: torch.Tensor | None = None  # (B, 1)
    seen: torch.Tensor | None = None  # (B, V) bool: the token is in the prompt or the output
    presence_penalty: torch.Tensor | None = None  # (B, 1)
    frequency_penalty: torch.Tensor | None = None  # (B, 1)
    output_counts: torch.Tensor | None = None  # (B, V) how often each token was generated
    banned: torch.Tensor | None = None  # (B, V) bool: EOS and stop ids, before min_tokens are out
    allowed: torch.Tensor | None = None  # (B, V) bool: all True on rows without allowed_token_ids
    bias_at: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows (K,), token ids (K,)): one entry per bias
    bias: torch.Tensor | None = None  # (K,) the logit_bias values, added at bias_at

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        token_ids: list[list[int]],
        num_prompt_tokens: list[int],
        eos_ids: list[int],
        vocab_size: int,
        generators: list[torch.Generator | None],
        device: torch.device | str = "cpu",
    ) -> SamplingBatch:
        """The tensors for rows of (params, prompt + output token ids, prompt length, random stream)."""
        B, V = len(params), vocab_size

        def column(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        greedy = [p.greedy for p in params]
        batch = cls(
            greedy, column([1.0 if g else p.temperature for g, p in zip(greedy, params)], torch.float32), generators
        )
        if any(p.top_k > 0 for p in params):
            batch.top_k = column([p.top_k for p in params], torch.long)
        if any(p.top_p < 1.0 for p in params):
            batch.top_p = column([p.top_p for p in params], torch.float32)
        if any(p.min_p > 0.0 for p in params):
            batch.min_p = column([p.min_p for p in params], torch.float32)
        if any(p.repetition_penalty != 1.0 for p in params):
            batch.repetition_penalty = column([p.repetition_penalty for p in params], torch.float32)[:, None]
            batch.seen = torch.zeros(B, V, dtype=torch.bool, device=device)
            for row, (p, ids) in enumerate(zip(params, token_ids)):
                if p.repetition_penalty != 1.0:
                    batch.seen[row, column(ids, torch.long)] = True
        if any(p.presence_penalty or p.frequency_penalty for p in params):
            batch.presence_penalty = column([p.presence_penalty for p in params], torch.float32)[:, None]
            batch.frequency_penalty = column([p.frequency_penalty for p in params], torch.float32)[:, None]
            batch.output_counts = torch.zeros(B, V, device=device)
            for row, (ids, n) in enumerate(zip(token_ids, num_prompt_tokens)):
                out = column(ids[n:], torch.long)
                batch.output_counts[row].index_add_(0, out, torch.ones(len(out), device=device))
        if any(p.allowed_token_ids for p in params):
            batch.allowed = torch.ones(B, V, dtype=torch.bool, device=device)
            for row, p in enumerate(params):
                if p.allowed_token_ids:
                    batch.allowed[row] = False
                    batch.allowed[row, column(p.allowed_token_ids, torch.long)] = True
        if any(p.logit_bias for p in params):
            # sparse: (row, token id, bias) triples, scattered onto the logits in one index_put
            entries = [(row, t, b) for row, p in enumerate(params) for t, b in (p.logit_bias or {}).items()]
            rows, ids, biases = zip(*entries)
            batch.bias_at = (column(rows, torch.long), column(ids, torch.long))
            batch.bias = column(biases, torch.float32)
        early = [
            row
            for row, (p, ids, n) in enumerate(zip(params, token_ids, num_prompt_tokens))
            if len(ids) - n < p.min_tokens
        ]
        if early:
            batch.banned = torch.zeros(B, V, dtype=torch.bool, device=device)
            for row in early:
                p = params[row]
                batch.banned[
                    row, column(list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_ids)), torch.long)
                ] = True
        return batch


def apply_logit_bias(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """allowed_token_ids (every other token to -inf), then logit_bias added: first of all, before the penalties and
    temperature, in vLLM's order (what a bias of +-100 does then does not depend on the other settings)."""
    if batch.allowed is not None:
        logits = logits.masked_fill(~batch.allowed, float("-inf"))
    if batch.bias is not None:
        logits = logits.index_put(batch.bias_at, batch.bias, accumulate=True)
    return logits


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition penalty (over prompt and output, as in transformers), presence and frequency (over output)."""
    if batch.repetition_penalty is not None:
        penalized = torch.where(logits > 0, logits / batch.repetition_penalty, logits * batch.repetition_penalty)
        logits = torch.where(batch.seen, penalized, logits)
    if batch.output_counts is not None:
        counts = batch.output_counts
        logits = logits - batch.frequency_penalty * counts - batch.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def block_stop_tokens(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Before min_tokens are out, EOS and stop ids cannot be chosen."""
    return logits if batch.banned is None else logits.masked_fill(batch.banned, float("-inf"))


def sample(logits: torch.Tensor, batch: SamplingBatch) -> list[int]:
    """One token per row of logits (B, V), each row with its own parameters and random stream."""
    logits = block_stop_tokens(apply_penalties(apply_logit_bias(logits.float(), batch), batch), batch)
    if all(batch.greedy):
        return logits.argmax(dim=-1).tolist()
    scaled = logits / batch.temperature[:, None]
    if batch.top_k is not None:
        scaled = apply_top_k(scaled, batch.top_k)
    if batch.top_p is not None:
        scaled = apply_top_p(scaled, batch.top_p)
    if batch.min_p is not None:
        scaled = apply_min_p(scaled, batch.min_p)
    probs = scaled.softmax(dim=-1)
    # one draw per row from that request's own generator: a seeded request gets the same tokens whatever else
    # shares its batch (and, with temperature alone, the same tokens as chapters 1-3)
    return [
        int(logits[row].argmax()) if greedy else int(torch.multinomial(probs[row], 1, generator=gen))
        for row, (greedy, gen) in enumerate(zip(batch.greedy, batch.generators))
    ]
