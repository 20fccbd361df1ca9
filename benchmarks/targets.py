"""The ROADMAP's throughput targets, as ratios between two engines measured in one run (one table, read by
the benchmark's report and by tests/test_perf.py, which picks up each target once both chapters exist)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    engine: str  # the chapter that must be faster ...
    baseline: str  # ... than this one
    min_ratio: float  # output tok/s of engine / baseline, median of pairwise rounds
    workload: str
    device: str = "cpu"
    text: str = ""


TARGETS: list[Target] = [
    Target("ch02", "ch01", 5.0, "decode-1", text="a KV cache: >= 5x the naive loop at 256 new tokens"),
    Target("ch03", "ch02", 0.9, "decode-1", text="paged KV blocks cost little: >= 0.9x the contiguous cache"),
    Target("ch04", "ch03", 2.0, "mixed-64", text="continuous batching: >= 2x on 64 mixed-length requests"),
    Target("ch05", "ch04", 1.0, "mixed", device="cuda", text="Triton attention: faster than the PyTorch paged path"),
    Target("ch06", "ch05", 2.0, "decode-1", device="cuda", text="CUDA graphs: >= 2x decode at small batch"),
]


def pair_ratio(runs_a: list[dict], runs_b: list[dict]) -> float:
    """Median over rounds of A's output tok/s over B's, paired round by round (runs as in results.json)."""
    return statistics.median(a["output_tok_s"] / b["output_tok_s"] for a, b in zip(runs_a, runs_b))


def check_targets(results: dict) -> list[dict]:
    """Each target whose two engines and workload are in `results` (a benchmark JSON): the ratio, pass or fail.

    The ratio is the median over rounds of engine/baseline output tok/s, paired round by round."""
    out = []
    for t in TARGETS:
        wl = results.get("workloads", {}).get(t.workload)
        if wl is None or t.engine not in wl["engines"] or t.baseline not in wl["engines"]:
            continue
        if results.get("machine", {}).get("device_type", "cpu") != t.device:
            continue
        ratio = pair_ratio(wl["engines"][t.engine]["runs"], wl["engines"][t.baseline]["runs"])
        out.append(
            {
                "engine": t.engine,
                "baseline": t.baseline,
                "workload": t.workload,
                "ratio": ratio,
                "min_ratio": t.min_ratio,
                "met": ratio >= t.min_ratio,
                "text": t.text,
            }
        )
    return out
