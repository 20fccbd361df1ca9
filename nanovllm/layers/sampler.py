"""The sampler: per-request penalties, temperature, top-k, top-p, min-p, then a draw from each request's stream."""

from __future__ import annotations

import torch

from nanovllm.engine.sequence import Sequence


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


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Repetition penalty (over prompt and output, as in transformers), presence and frequency (over output)."""
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), device=logits.device)
            picked = logits[row, seen]
            logits[row, seen] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        if p.presence_penalty or p.frequency_penalty:
            counts = torch.bincount(
                torch.tensor(seq.output_ids, dtype=torch.long, device=logits.device), minlength=logits.shape[-1]
            ).to(logits.dtype)
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def block_stop_tokens(logits: torch.Tensor, seqs: list[Sequence], eos_ids: list[int]) -> torch.Tensor:
    """Before min_tokens are out, EOS and stop ids cannot be chosen."""
    for row, seq in enumerate(seqs):
        if len(seq.output_ids) < seq.params.min_tokens:
            banned = list(seq.params.stop_token_ids) + ([] if seq.params.ignore_eos else list(eos_ids))
            logits[row, banned] = float("-inf")
    return logits


def sample(logits: torch.Tensor, seqs: list[Sequence], eos_ids: list[int]) -> list[int]:
    """One token per row of logits (B, V), each row with its own SamplingParams and random stream."""
    logits = block_stop_tokens(apply_penalties(logits.float().clone(), seqs), seqs, eos_ids)
    params = [s.params for s in seqs]
    if all(p.greedy for p in params):
        return logits.argmax(dim=-1).tolist()
    temperature = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=logits.device)
    scaled = logits / temperature[:, None]
    if any(p.top_k > 0 for p in params):
        scaled = apply_top_k(scaled, torch.tensor([p.top_k for p in params], device=logits.device))
    if any(p.top_p < 1.0 for p in params):
        scaled = apply_top_p(scaled, torch.tensor([p.top_p for p in params], device=logits.device))
    if any(p.min_p > 0.0 for p in params):
        scaled = apply_min_p(scaled, torch.tensor([p.min_p for p in params], device=logits.device))
    probs = scaled.softmax(dim=-1)
    # one draw per row from that request's own generator: a seeded request gets the same tokens whatever else
    # shares its batch (and, with temperature alone, the same tokens as chapters 1-3)
    return [
        int(logits[row].argmax()) if p.greedy else int(torch.multinomial(probs[row], 1, generator=seq.generator))
        for row, (p, seq) in enumerate(zip(params, seqs))
    ]
