"""Exercises for ch04: your version of nanovllm.layers.sampler.

Fill in each function marked with a task; the docstring says what it computes.
Check your work with: pytest --impl=exercises -m ch04 -k "task3|task4|task5"
"""

from __future__ import annotations
from dataclasses import dataclass
import torch
from nanovllm.sampling_params import SamplingParams
from nanovllm.layers.sampler import SamplingBatch, apply_logit_bias, apply_penalties, block_stop_tokens, sample  # the rest of the file, as given


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
    raise NotImplementedError("ch04 task 3: keep the k most likely tokens")


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
    raise NotImplementedError("ch04 task 4: nucleus (top-p) filtering")


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens less likely than min_p times the most likely token of their row. min_p = 0 keeps all.

    Args:
        logits: (B, V) float logits.
        min_p: (B,) in [0, 1].
    Returns:
        (B, V) logits with the removed entries at -inf.
    """
    raise NotImplementedError("ch04 task 5: drop tokens below min_p x the top one")
