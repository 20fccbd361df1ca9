"""Sequence: one request inside the engine: its tokens, its blocks, how far its KV has been computed."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum, auto

import torch

from nanovllm.sampling_params import SamplingParams

_ids = itertools.count()


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass(eq=False)
class Sequence:
    token_ids: list[int]  # prompt, then generated tokens
    params: SamplingParams = field(default_factory=SamplingParams)
    seq_id: int = field(default_factory=lambda: next(_ids))
    num_prompt_tokens: int = -1
    block_table: list[int] = field(default_factory=list)  # physical block of each logical block
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache at admission
    num_computed_tokens: int = 0  # tokens whose KV is in the cache (advanced only after the forward wrote it)
    num_hashed_blocks: int = 0  # leading full blocks already offered to the prefix cache
    status: Status = Status.WAITING
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    request_id: int = -1  # the engine's id for it
    error: str | None = None  # why it finished with finish_reason "error"
    forks_left: int = 0  # candidates still to fork from it once its prompt is computed (best_of / n > 1)
    cumulative_logprob: float = 0.0  # sum of its output tokens' log-probabilities
    token_logprobs: list = field(default_factory=list)  # per output token: (logprob, [(alternative, logprob)])
    prompt_logprobs: list | None = None  # prompt_logprobs asked: None, then one record per prompt token computed

    def __post_init__(self) -> None:
        self.token_ids = list(self.token_ids)
        if self.num_prompt_tokens < 0:
            self.num_prompt_tokens = len(self.token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def wants_prompt_logits(self) -> bool:
        """It asked for prompt logprobs and some are still to compute: every prompt position needs its logits, so
        the prefix cache, whose blocks have none, is skipped (as vLLM does)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def block_tokens(self, index: int, block_size: int) -> list[int]:
        return self.token_ids[index * block_size : (index + 1) * block_size]
