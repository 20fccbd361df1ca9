"""SamplingParams: how one request chooses its tokens and when it stops. Invalid values fail here, at the boundary."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy (argmax)
    max_tokens: int = 64  # most tokens to generate
    min_tokens: int = 0  # EOS and stop ids are ignored until this many tokens exist
    ignore_eos: bool = False  # keep going past EOS (benchmarks use this)
    seed: int | None = None  # same seed, same tokens, whatever else is in the batch
    top_k: int = -1  # keep the k most likely tokens; -1 (or 0) keeps all
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p
    min_p: float = 0.0  # drop tokens less likely than min_p * the most likely one
    repetition_penalty: float = 1.0  # >1 discourages tokens already in prompt or output
    presence_penalty: float = 0.0  # subtracted once from tokens already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    stop: list[str] = field(default_factory=list)  # stop strings, matched on the detokenized text
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        _number("temperature", self.temperature, low=0.0)
        _integer("max_tokens", self.max_tokens, low=1)
        _integer("min_tokens", self.min_tokens, low=0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if self.seed is not None:
            _integer("seed", self.seed)
        _integer("top_k", self.top_k, low=-1)
        _number("top_p", self.top_p, low=0.0, high=1.0)
        if self.top_p == 0.0:
            raise ValueError("top_p must be in (0, 1], got 0 (use temperature=0 for greedy)")
        _number("min_p", self.min_p, low=0.0, high=1.0)
        _number("repetition_penalty", self.repetition_penalty, low=0.0)
        if self.repetition_penalty == 0.0:
            raise ValueError("repetition_penalty must be > 0, got 0")
        _number("presence_penalty", self.presence_penalty, low=-2.0, high=2.0)
        _number("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        for t in self.stop_token_ids:
            _integer("stop_token_ids", t, low=0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def non_default(self, names: tuple[str, ...]) -> list[str]:
        """Which of these fields differ from their defaults (chapters use it to refuse what they lack)."""
        defaults = SamplingParams()
        return [f.name for f in fields(self) if f.name in names and getattr(self, f.name) != getattr(defaults, f.name)]


def _number(name: str, value: object, low: float | None = None, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bounds}, got {value!r}")


def _integer(name: str, value: object, low: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
