"""Seeded benchmark workloads: lists of (prompt token ids, output length) that every engine receives identically."""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    max_tokens: int  # generated exactly (EOS is ignored)


@dataclass(frozen=True)
class WorkloadSpec:
    """How to draw a workload; lengths are drawn uniformly from the inclusive ranges."""

    name: str
    description: str
    num_requests: int
    prompt_len: tuple[int, int]
    output_len: tuple[int, int]
    shared_prefix: int = 0  # tokens every prompt starts with (the long system prompt)
    seed: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def longest(self) -> int:
        """Tokens in the longest possible request (prompt + output)."""
        return self.shared_prefix + self.prompt_len[1] + self.output_len[1]

    def with_options(self, **options: Any) -> WorkloadSpec:
        """A copy with fields overridden: num_requests=8, output_len=64 (or (lo, hi)), shared_prefix=..."""
        fixed = {}
        for key, value in options.items():
            if key not in {"num_requests", "prompt_len", "output_len", "shared_prefix", "seed"}:
                raise ValueError(f"unknown workload option {key!r}")
            if key in ("prompt_len", "output_len") and isinstance(value, int):
                value = (value, value)
            value = tuple(value) if isinstance(value, list) else value
            if key in ("prompt_len", "output_len"):
                if not (isinstance(value, tuple) and len(value) == 2 and all(type(v) is int for v in value)
                        and 1 <= value[0] <= value[1]):  # fmt: skip
                    raise ValueError(
                        f"workload option {key} must be N or (LOW, HIGH) with 1 <= LOW <= HIGH, got {value!r}"
                    )
            elif type(value) is not int or value < (1 if key == "num_requests" else 0):
                raise ValueError(
                    f"workload option {key} must be an integer >= {int(key == 'num_requests')}, got {value!r}"
                )
            fixed[key] = value
        return replace(self, **fixed)


# nano-vLLM's published benchmark: 256 requests, prompt and output lengths uniform in 100..1024.
WORKLOADS: dict[str, WorkloadSpec] = {
    w.name: w
    for w in [
        WorkloadSpec(
            "decode-1", "one request, 32-token prompt, 256 new tokens (latency-bound)", 1, (32, 32), (256, 256)
        ),
        WorkloadSpec(
            "decode-8",
            "8 requests, 32-token prompts, 256 new tokens each, decoding together (small-batch decode; GPU)",
            8,
            (32, 32),
            (256, 256),
        ),
        WorkloadSpec(
            "mixed", "16 requests, prompts 16-128, outputs 16-128 (CPU-sized throughput)", 16, (16, 128), (16, 128)
        ),
        WorkloadSpec("mixed-small", "8 requests, prompts 8-64, outputs 8-64 (perf tests, CI)", 8, (8, 64), (8, 64)),
        WorkloadSpec(
            "mixed-64",
            "64 requests, prompts 16-512, outputs 16-256 (where continuous batching shows)",
            64,
            (16, 512),
            (16, 256),
        ),
        WorkloadSpec(
            "mixed-32",
            "32 requests, prompts 16-256, outputs 16-128 (the llama-server comparison's mixed load)",
            32,
            (16, 256),
            (16, 128),
        ),
        WorkloadSpec(
            "nano-vllm-bench",
            "256 requests, prompts and outputs 100-1024 (nano-vLLM's GPU benchmark)",
            256,
            (100, 1024),
            (100, 1024),
        ),
        WorkloadSpec(
            "shared-prefix",
            "16 requests sharing a 192-token system prompt, 16-64 own tokens, 32-64 out",
            16,
            (16, 64),
            (32, 64),
            shared_prefix=192,
        ),
    ]
}


def batch_workload(batch: int, prompt_len: int = 64, output_len: int = 64) -> WorkloadSpec:
    """`batch-N`: N requests of equal lengths submitted together (throughput and latency vs batch size)."""
    return WorkloadSpec(
        f"batch-{batch}",
        f"{batch} requests, prompt {prompt_len}, {output_len} new tokens",
        batch,
        (prompt_len, prompt_len),
        (output_len, output_len),
    )


def get_spec(name: str) -> WorkloadSpec:
    if name in WORKLOADS:
        return WORKLOADS[name]
    if name.startswith("batch-") and name[6:].isdigit() and int(name[6:]) > 0:
        return batch_workload(int(name[6:]))
    raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)} or batch-N")


def fit_to_context(spec: WorkloadSpec, max_model_len: int) -> WorkloadSpec:
    """Scale the length ranges down (keeping their shape) when the longest request would not fit the model."""
    longest = spec.longest
    if longest < max_model_len:
        return spec
    f = (max_model_len - 1) / longest

    def scale(lo_hi: tuple[int, int]) -> tuple[int, int]:
        return max(1, int(lo_hi[0] * f)), max(1, int(lo_hi[1] * f))

    note = f"lengths scaled by {f:.3f} to fit the model's context of {max_model_len} tokens"
    return replace(
        spec,
        prompt_len=scale(spec.prompt_len),
        output_len=scale(spec.output_len),
        shared_prefix=int(spec.shared_prefix * f),
        notes=[*spec.notes, note],
    )


@dataclass(frozen=True)
class Workload:
    spec: WorkloadSpec
    requests: list[Request]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt) for r in self.requests)

    @property
    def output_tokens(self) -> int:
        return sum(r.max_tokens for r in self.requests)

    def capped(self, max_tokens: int) -> Workload:
        """The same prompts with outputs cut to at most `max_tokens` (a short warm-up run)."""
        return Workload(self.spec, [Request(r.prompt, min(r.max_tokens, max_tokens)) for r in self.requests])

    def summary(self) -> dict[str, Any]:
        return {
            **asdict(self.spec),
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "num_requests": len(self.requests),
        }


def make_workload(
    spec: WorkloadSpec, vocab_size: int, max_model_len: int, avoid: Iterable[int] = (0, 1, 2), variant: int = 0
) -> Workload:
    """Draw the requests: the same spec, vocabulary and variant give the same token ids, always.

    The lengths depend on the spec alone; the token ids also on `variant`, so each measured
    round can get fresh prompts of the same shape (no engine reuses a prefix cached in an
    earlier round) while every engine in one round gets identical ones. Prompt tokens avoid
    the special ids (BOS, EOS, padding) so no engine treats them differently.
    """
    spec = fit_to_context(spec, max_model_len)
    shape = random.Random(f"{spec.name}:{spec.seed}")
    lengths = [(shape.randint(*spec.prompt_len), shape.randint(*spec.output_len)) for _ in range(spec.num_requests)]
    ids = random.Random(f"{spec.name}:{spec.seed}:{variant}")
    avoid = set(avoid)
    pool_lo = min(i for i in range(vocab_size) if i not in avoid)

    def token() -> int:
        while True:
            t = ids.randrange(pool_lo, vocab_size)
            if t not in avoid:
                return t

    prefix = [token() for _ in range(spec.shared_prefix)]
    requests = [Request(prefix + [token() for _ in range(n_prompt)], n_out) for n_prompt, n_out in lengths]
    return Workload(spec, requests)
