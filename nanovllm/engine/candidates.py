"""Parallel sampling: a request with n (or best_of) > 1 runs that many candidates, which share its prompt's KV blocks.

The prompt is computed once. When its last token's logits come out, every candidate draws its own first token
from them, each from its own random stream, and the candidates fork from the first one: they share its blocks by
reference count, and the first write into the shared, partly filled last block copies it (copy on write). Each
candidate then runs as a request of its own; the n with the highest cumulative log-probability are returned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SEED_END


@dataclass
class Row:
    """One token to draw this step: for `seq`, or (new) for a candidate about to fork from it."""

    seq: Sequence
    generator: torch.Generator | None
    logits_row: int  # which row of the step's logits it draws from
    new: bool = False


def candidate_rows(seqs: list[Sequence], shared: torch.Generator) -> list[Row]:
    """A row per sequence that samples this step, and after a request whose prompt was just computed, a row for
    each of its other candidates. Candidate j of a seeded request draws from its own stream, seeded seed + j."""
    rows = []
    for i, seq in enumerate(seqs):
        rows.append(Row(seq, seq.generator, i))
        if seq.forks_left and not seq.output_ids:
            seed = seq.params.seed
            for j in range(1, seq.forks_left + 1):
                generator = (
                    shared if seed is None else torch.Generator(shared.device).manual_seed((seed + j) % SEED_END)
                )
                rows.append(Row(seq, generator, i, new=True))
    return rows


def record_logprob(seq: Sequence, token: int, logprobs: torch.Tensor) -> None:
    """Add the sampled token's log-probability (logprobs: (V,) of the model's distribution) to the sequence's sum,
    and, when the request asked for logprobs, keep it with the k most likely alternatives."""
    value = float(logprobs[token])
    seq.cumulative_logprob += value
    k = seq.params.logprobs
    if k is not None:
        top = logprobs.topk(k) if k else None
        alternatives = [(int(t), float(v)) for v, t in zip(top.values, top.indices)] if top is not None else []
        seq.token_logprobs.append((value, alternatives))


def record_prompt_logprobs(seq: Sequence, start: int, logits: torch.Tensor) -> None:
    """Logprobs of the prompt tokens this step's chunk scores: logits (n, V) at positions start.. of the sequence,
    where position p's logits score the prompt token at p + 1. Recomputed positions (after a preemption) overwrite."""
    del seq.prompt_logprobs[start + 1 :]
    targets = seq.token_ids[start + 1 : seq.num_prompt_tokens][: len(logits)]
    if not targets:
        return
    logprobs = logits[: len(targets)].float().log_softmax(-1)  # (m, V)
    chosen = logprobs.gather(-1, torch.tensor(targets, device=logprobs.device)[:, None])[:, 0].tolist()  # (m,)
    k = seq.params.prompt_logprobs
    top = logprobs.topk(k) if k else None
    for j, value in enumerate(chosen):
        alternatives = list(zip(top.indices[j].tolist(), top.values[j].tolist())) if top is not None else []
        seq.prompt_logprobs.append((value, alternatives))


def best_of(results: list[dict], n: int) -> list[dict]:
    """The n results with the highest cumulative log-probability, best first: what best_of returns of its candidates.

    Each result is one candidate's output dict, with its "cumulative_logprob" (the sum of its tokens' logprobs).
    Candidates with equal sums keep their order (the first candidate first): sort stably. Returns the dicts
    themselves, not copies; fewer than n if there are fewer results.
    """
    return sorted(results, key=lambda r: -r["cumulative_logprob"])[:n]
