"""SamplingParams: how one request chooses its tokens and when it stops. Invalid values fail here, at the boundary."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

GREEDY_BELOW = 1e-5  # a temperature below this is greedy, as in vLLM: the sampler never divides by it
MAX_TEMPERATURE = 1e4  # already all but uniform; a float32 temperature column stays finite
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0  # x100 either way: near 0 logits overflow
INT32_END = 2**31  # token counts, top_k and token ids stay below this
MAX_CANDIDATES = 64  # n and best_of: sequences one request may run at once
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI allows
MAX_LOGIT_BIAS = 100.0  # OpenAI's bound on a logit bias, either way
SEED_END = 2**64  # torch.Generator.manual_seed takes a seed in [0, 2**64)


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 (anything below GREEDY_BELOW) means greedy (argmax); at most MAX_TEMPERATURE
    max_tokens: int = 64  # most tokens to generate, below 2**31
    min_tokens: int = 0  # EOS and stop ids are ignored until this many tokens exist
    ignore_eos: bool = False  # keep going past EOS (benchmarks use this)
    seed: int | None = None  # same seed, same tokens, whatever else is in the batch; in [0, 2**64)
    top_k: int = -1  # keep the k most likely tokens (k < 2**31); -1 (or 0) keeps all
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p
    min_p: float = 0.0  # drop tokens less likely than min_p * the most likely one
    repetition_penalty: float = 1.0  # >1 discourages tokens already in prompt or output; in [0.01, 100]
    presence_penalty: float = 0.0  # subtracted once from tokens already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    stop: list[str] = field(default_factory=list)  # stop strings, matched on the detokenized text (None: none)
    stop_token_ids: list[int] = field(default_factory=list)  # (None: none)
    include_stop_str_in_output: bool = False
    n: int = 1  # completions returned for the prompt
    best_of: int | None = None  # candidates generated (sharing the prompt's KV blocks); the n most likely returned
    logprobs: int | None = None  # with each token, its log-probability and this many most likely alternatives
    prompt_logprobs: int | None = None  # the same for each prompt token from the second (the first has none)
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (before penalties); in [-100, 100]
    allowed_token_ids: list[int] | None = None  # only these may be generated: every other logit is -inf

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif not isinstance(self.stop, (list, tuple)):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        self.stop = list(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif not isinstance(self.stop_token_ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
        self.stop_token_ids = list(self.stop_token_ids)
        _number("temperature", self.temperature, low=0.0, high=MAX_TEMPERATURE)
        _integer("max_tokens", self.max_tokens, low=1, high=INT32_END)
        _integer("min_tokens", self.min_tokens, low=0, high=INT32_END)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        _flag("ignore_eos", self.ignore_eos)
        _flag("include_stop_str_in_output", self.include_stop_str_in_output)
        if self.seed is not None:
            _integer("seed", self.seed, low=0, high=SEED_END)
        _integer("top_k", self.top_k, low=-1, high=INT32_END)
        _number("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:  # 0 is excluded: an empty nucleus
            greedy = " (use temperature=0 for greedy)" if self.top_p == 0.0 else ""
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}{greedy}")
        _number("min_p", self.min_p, low=0.0, high=1.0)
        _number("repetition_penalty", self.repetition_penalty, low=MIN_REPETITION_PENALTY, high=MAX_REPETITION_PENALTY)
        _number("presence_penalty", self.presence_penalty, low=-2.0, high=2.0)
        _number("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        for t in self.stop_token_ids:
            _integer("stop_token_ids", t, low=0, high=INT32_END)
        _integer("n", self.n, low=1, high=MAX_CANDIDATES + 1)
        if self.best_of is not None:
            _integer("best_of", self.best_of, low=1, high=MAX_CANDIDATES + 1)
            if self.best_of < self.n:
                raise ValueError(f"best_of ({self.best_of}) must be >= n ({self.n})")
        if self.logprobs is not None:
            _integer("logprobs", self.logprobs, low=0, high=MAX_LOGPROBS + 1)
        if self.prompt_logprobs is not None:
            _integer("prompt_logprobs", self.prompt_logprobs, low=0, high=MAX_LOGPROBS + 1)
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias must be a dict of token id -> bias, got {self.logit_bias!r}")
            for token, bias in self.logit_bias.items():
                _integer("logit_bias keys (token ids)", token, low=0, high=INT32_END)
                _number(f"logit_bias[{token}]", bias, low=-MAX_LOGIT_BIAS, high=MAX_LOGIT_BIAS)
            self.logit_bias = dict(self.logit_bias) or None  # {} biases nothing: the default
        if self.allowed_token_ids is not None:
            if not isinstance(self.allowed_token_ids, (list, tuple, set, frozenset)) or not self.allowed_token_ids:
                wrong = self.allowed_token_ids
                raise ValueError(f"allowed_token_ids must be a non-empty list of token ids, got {wrong!r}")
            for t in self.allowed_token_ids:
                _integer("allowed_token_ids", t, low=0, high=INT32_END)
            self.allowed_token_ids = sorted(set(self.allowed_token_ids))

    @property
    def candidates(self) -> int:
        """How many sequences the request runs: best_of, or n."""
        return self.best_of or self.n

    @property
    def greedy(self) -> bool:
        """Argmax, not a draw: temperature 0, or so close to it that dividing the logits by it would overflow."""
        return self.temperature < GREEDY_BELOW

    def non_default(self, names: tuple[str, ...]) -> list[str]:
        """Which of these fields differ from their defaults (chapters use it to refuse what they lack)."""
        defaults = SamplingParams()
        return [f.name for f in fields(self) if f.name in names and getattr(self, f.name) != getattr(defaults, f.name)]


def _number(name: str, value: object, low: float | None = None, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int too large for a float
        finite = False
    if not finite:
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bounds}, got {value!r}")


def _integer(name: str, value: object, low: int | None = None, high: int | None = None) -> None:
    """An int (not a bool) in [low, high): high is exclusive, as in range()."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    if high is not None and value >= high:
        raise ValueError(f"{name} must be below {_power_of_two(high)}, got {value!r}")


def _flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def _power_of_two(n: int) -> str:
    """2**31 for 2147483648: a bound people recognise."""
    return f"2**{n.bit_length() - 1}" if n > 1024 and n & (n - 1) == 0 else str(n)
