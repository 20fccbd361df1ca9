"""Exercises for ch04: your version of nanovllm.engine.candidates.

Fill in each function marked with a task; the docstring says what it computes.
Check your work with: pytest --impl=exercises -m ch04 -k "task7"
"""

from __future__ import annotations
from dataclasses import dataclass
import torch
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SEED_END
from nanovllm.engine.candidates import Row, candidate_rows, record_logprob, record_prompt_logprobs  # the rest of the file, as given


def best_of(results: list[dict], n: int) -> list[dict]:
    """The n results with the highest cumulative log-probability, best first: what best_of returns of its candidates.

    Each result is one candidate's output dict, with its "cumulative_logprob" (the sum of its tokens' logprobs).
    Candidates with equal sums keep their order (the first candidate first): sort stably. Returns the dicts
    themselves, not copies; fewer than n if there are fewer results.
    """
    raise NotImplementedError("ch04 task 7: the n most likely candidates, best first")
