"""The ROADMAP's throughput targets, checked as ratios between two chapters measured side by side (never seconds).

Every target in benchmarks/targets.py becomes a test here; it skips, saying why, until both of its
chapters exist. Each runs the benchmark's own method (warm-up, interleaved rounds, median of the
pairwise ratios) on a small random-weight model, and asks for the target times a safety margin.

    pytest -m perf tests/test_perf.py
    NANOVLLM_PERF_MARGIN=1.0 NANOVLLM_PERF_THREADS=2 pytest -m perf tests/test_perf.py   # the bare target
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks.engines import chapter_packages
from benchmarks.models import resolve_model
from benchmarks.runner import Settings, run
from benchmarks.targets import TARGETS, Target

MARGIN = float(os.environ.get("NANOVLLM_PERF_MARGIN", "0.8"))  # pass at 80% of the target: machines are noisy
# One thread by default: on a shared 2-core machine a second thread mostly waits for a busy core.
THREADS = int(os.environ.get("NANOVLLM_PERF_THREADS", "1"))
MODEL = os.environ.get("NANOVLLM_PERF_MODEL", "llama-5m")  # 4.5M params: compute matters, a run takes seconds
REPEATS = 3


@pytest.fixture(scope="session")
def perf_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The perf model, built (seeded) into this session's temporary folder."""
    return str(resolve_model(MODEL, cache=tmp_path_factory.mktemp("bench-models")).path)


def missing_reason(t: Target) -> str | None:
    have = chapter_packages()
    missing = [c for c in (t.engine, t.baseline) if c not in have]
    if missing:
        return f"{' and '.join(missing)} {'does' if len(missing) == 1 else 'do'} not exist yet"
    if t.device == "cuda" and not torch.cuda.is_available():
        return "a GPU target, and there is no CUDA device here"
    return None


def target_id(t: Target) -> str:
    return f"{t.engine}-vs-{t.baseline}-{t.workload}"


# Targets measured and not met yet: they run, and are reported as xfail (XPASS once met) with what was seen.
KNOWN_GAPS: dict[str, str] = {}  # none at present


@pytest.mark.perf
@pytest.mark.parametrize("target", TARGETS, ids=[target_id(t) for t in TARGETS])
def test_ratio_target(target: Target, perf_model: str, request: pytest.FixtureRequest) -> None:
    reason = missing_reason(target)
    if reason:
        pytest.skip(reason)
    if target_id(target) in KNOWN_GAPS:
        request.applymarker(pytest.mark.xfail(reason=KNOWN_GAPS[target_id(target)], strict=False))
    settings = Settings(
        model=perf_model,
        workloads=[target.workload],
        engines=[target.baseline, target.engine],
        baseline=target.baseline,
        repeats=REPEATS,
        warmup_tokens=16,
        device=target.device,
        dtype="float32" if target.device == "cpu" else "bfloat16",
        threads=THREADS,
        bandwidth=False,
    )
    results = run(settings, log=lambda message: None)
    row = results["workloads"][target.workload]["engines"][target.engine]
    ratio, rounds = row["ratio_vs_baseline"], row["ratios_per_round"]
    need = target.min_ratio * MARGIN
    assert ratio >= need, (
        f"{target.engine} is {ratio:.2f}x {target.baseline} on {target.workload} (rounds: "
        f"{', '.join(f'{r:.2f}' for r in rounds)}); the ROADMAP asks >= {target.min_ratio}x ({target.text}), "
        f"this test >= {need:.2f}x"
    )
    assert row["same_tokens_as_baseline"] == 1.0, f"{target.engine} and {target.baseline} disagree on greedy tokens"
