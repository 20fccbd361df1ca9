"""The measuring method: warm-up, interleaved rounds (A B A B ...), medians, pairwise ratios, memory, bandwidth."""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks.engines import Engine, RunResult
from benchmarks.workloads import Workload


def rss_bytes() -> int | None:
    """The process's resident memory now (Linux /proc, else psutil when installed)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        try:
            import psutil

            return psutil.Process().memory_info().rss
        except ImportError:
            return None


class PeakMemory:
    """Samples the process RSS (and CUDA's peak allocation) while the block runs: `with PeakMemory() as m:`."""

    def __init__(self, device: str = "cpu", interval_s: float = 0.005):
        self.device, self.interval = device, interval_s
        self.start = self.peak = rss_bytes()
        self.cuda_start = self.cuda_peak = None
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        self.start = self.peak = rss_bytes()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.cuda_start = torch.cuda.memory_allocated()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            now = rss_bytes()
            if now is not None and (self.peak is None or now > self.peak):
                self.peak = now

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample_once()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.cuda_peak = torch.cuda.max_memory_allocated()

    def _sample_once(self) -> None:
        now = rss_bytes()
        if now is not None and (self.peak is None or now > self.peak):
            self.peak = now

    @property
    def growth(self) -> int | None:
        """How far memory rose above where it started (CUDA allocations on a GPU, else the RSS)."""
        if self.cuda_peak is not None:
            return self.cuda_peak - (self.cuda_start or 0)
        return None if self.peak is None or self.start is None else self.peak - self.start


def copy_bandwidth(device: str = "cpu", mib: int = 256, repeats: int = 5) -> float:
    """Measured memory bandwidth in bytes/s: best of `repeats` copies of a `mib` MiB buffer, counting read + write
    (STREAM's 'copy' convention). The buffer is far larger than any cache."""
    n = mib * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):  # the first copy faults the pages in
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 4 / best


def read_bandwidth(device: str = "cpu", mib: int = 256, repeats: int = 5) -> float:
    """Measured read bandwidth in bytes/s: best of `repeats` sums of a `mib` MiB buffer, far larger than any cache, at
    torch's current thread count. A decode step only reads its weights, so this (not the copy bandwidth, which pays a
    write for every read) is what its roofline divides by."""
    n = mib * 2**20 // 4
    buf = torch.ones(n, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first sum faults the pages in
        sync(device)
        t0 = time.perf_counter()
        buf.sum()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return n * 4 / best


class Ticker:
    """While a long run goes on, a line every `every_s` seconds: how long it has run and how far it has got (a round
    of chapter 1 on a larger model takes minutes). Short runs print nothing."""

    def __init__(
        self,
        label: str,
        log: Callable[[str], None],
        progress: Callable[[], str | None] = lambda: None,
        every_s: float = 30.0,
    ):
        self.label, self.log, self.progress, self.every = label, log, progress, every_s
        self._stop = threading.Event()

    def __enter__(self) -> Ticker:
        self.t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._tick, daemon=True)
        self._thread.start()
        return self

    def _tick(self) -> None:
        while not self._stop.wait(self.every):
            try:
                told = self.progress()
            except Exception:  # progress is a courtesy: never let it stop a run
                told = None
            so_far = f"{time.perf_counter() - self.t0:.0f} s so far"
            self.log(f"    {self.label}: {so_far}" + (f", {told}" if told else ""))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100), the same as numpy's default."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median_p99(values: Sequence[float] | None) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "p99": percentile(values, 99)}


@dataclass
class RunMetrics:
    """One measured run of one engine on one workload."""

    wall_s: float
    output_tok_s: float
    total_tok_s: float
    req_s: float
    ttft_s: dict[str, float] | None
    tpot_s: dict[str, float] | None
    token_ids: list[list[int]] = field(repr=False, default_factory=list)
    forward_passes: int | None = None
    collective_s: float | None = None
    plan_s: float | None = None


def run_metrics(workload: Workload, result: RunResult, ttft_run_s: float | None = None) -> RunMetrics:
    """Throughputs from a run; checks that every request got exactly its requested number of tokens.

    `ttft_run_s`: for a one-request workload, the time of a max_tokens=1 run, taken as the time to first
    token on every engine, streaming or not, so that the column compares like with like. TPOT is the
    streamed one where the engine streams, else the rest of the run over n - 1 tokens.
    """
    for i, (r, toks) in enumerate(zip(workload.requests, result.token_ids)):
        if len(toks) != r.max_tokens:
            raise RuntimeError(f"request {i}: asked for {r.max_tokens} tokens (EOS ignored), got {len(toks)}")
    if len(result.token_ids) != len(workload.requests):
        raise RuntimeError(f"{len(workload.requests)} requests but {len(result.token_ids)} outputs")
    wall = result.wall_s
    ttft, tpot = result.ttft_s, result.tpot_s
    if ttft_run_s is not None and len(workload.requests) == 1:
        n = workload.requests[0].max_tokens
        ttft = [ttft_run_s]
        if tpot is None:
            tpot = [max(wall - ttft_run_s, 0.0) / (n - 1)] if n > 1 else [0.0]
    return RunMetrics(
        wall,
        workload.output_tokens / wall,
        (workload.output_tokens + workload.prompt_tokens) / wall,
        len(workload.requests) / wall,
        median_p99(ttft),
        median_p99(tpot),
        result.token_ids,
        result.forward_passes,
        result.collective_s,
        result.plan_s,
    )


@dataclass
class Measured:
    """Every round of every engine on one workload, plus the engines' memory."""

    workload: Workload
    rounds: dict[str, list[RunMetrics]] = field(default_factory=dict)
    peak_rss: dict[str, int | None] = field(default_factory=dict)  # process peak during the engine's runs
    run_growth: dict[str, int | None] = field(default_factory=dict)  # most memory a run added over its start
    ttft_source: dict[str, str | None] = field(default_factory=dict)


def measure(
    engines: Sequence[Engine],
    make: Callable[[int], Workload],
    repeats: int,
    warmup_tokens: int | None,
    device: str = "cpu",
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
    progress_s: float = 30.0,
) -> Measured:
    """Warm every engine up, then run `repeats` rounds, each running every engine once in turn (A B A B ...).

    `make(r)` gives round r's workload: the same lengths every round, fresh token ids per round
    (so no engine reuses a prefix it cached earlier), identical for every engine within a round.
    `warmup_tokens`: outputs capped to this many tokens in the warm-up round (None: the full
    workload; 0: no warm-up). `progress_s`: a run longer than this logs how far it has got, every `progress_s`.
    """
    base = make(0)
    out = Measured(base)
    if warmup_tokens != 0:
        warm = make(10_000)
        warm = warm if warmup_tokens is None else warm.capped(warmup_tokens)
        for e in engines:
            t0 = time.perf_counter()
            with Ticker(f"warm-up {e.name}", log, e.progress, progress_s):
                e.run(warm.requests)
            log(f"  warm-up {e.name}: {time.perf_counter() - t0:.2f} s")
    for e in engines:
        out.rounds[e.name], out.peak_rss[e.name], out.run_growth[e.name] = [], None, None
        out.ttft_source[e.name] = "max_tokens=1 run" if len(base.requests) == 1 else "streamed" if e.streams else None
    for r in range(repeats):
        work = make(r + 1)
        for e in engines:
            with PeakMemory(device) as mem, Ticker(f"round {r + 1}/{repeats} {e.name}", log, e.progress, progress_s):
                result = e.run(work.requests)
            ttft_run = None
            if len(work.requests) == 1:
                # every engine alike, streaming or not: a run of one token right after its own full run (a streamed
                # first token comes from a run that starts right after another engine's, and read 1.5-2x slower),
                # on a fresh prompt of the same length: the round's own prompt would be a prefix-cache hit
                ttft_run = e.run(make(20_000 + r).capped(1).requests).wall_s
            m = run_metrics(work, result, ttft_run)
            out.rounds[e.name].append(m)
            peak = mem.cuda_peak if mem.cuda_peak is not None else mem.peak
            growth = mem.growth
            if result.peak_mem_bytes is not None or result.mem_growth_bytes is not None:  # its own process's
                peak, growth = result.peak_mem_bytes, result.mem_growth_bytes
            if peak is not None:
                out.peak_rss[e.name] = max(out.peak_rss[e.name] or 0, peak)
            if growth is not None:
                out.run_growth[e.name] = max(out.run_growth[e.name] or 0, growth)
            log(f"  round {r + 1}/{repeats} {e.name}: {m.wall_s:.2f} s, {m.output_tok_s:.1f} out tok/s")
    return out


def ratios(rounds_a: Sequence[RunMetrics], rounds_b: Sequence[RunMetrics]) -> list[float]:
    """Output tok/s of A over B, round by round (each round's pair ran on the same prompts, back to back)."""
    return [a.output_tok_s / b.output_tok_s for a, b in zip(rounds_a, rounds_b)]


def summarize(m: Measured, engine: str, baseline: str | None) -> dict[str, Any]:
    """Medians over rounds, the median pairwise ratio to the baseline, and token agreement with the baseline."""
    runs = m.rounds[engine]

    def med(key: str, part: str | None = None) -> float | None:
        vals = [getattr(x, key) if part is None else (getattr(x, key) or {}).get(part) for x in runs]
        vals = [v for v in vals if v is not None]
        return statistics.median(vals) if vals else None

    out: dict[str, Any] = {
        "output_tok_s": med("output_tok_s"),
        "total_tok_s": med("total_tok_s"),
        "req_s": med("req_s"),
        "wall_s": med("wall_s"),
        "ttft_s": None
        if med("ttft_s", "median") is None
        else {"median": med("ttft_s", "median"), "p99": med("ttft_s", "p99")},
        "tpot_s": None
        if med("tpot_s", "median") is None
        else {"median": med("tpot_s", "median"), "p99": med("tpot_s", "p99")},
        "ttft_source": m.ttft_source.get(engine),
        "forward_passes": med("forward_passes"),
        "peak_mem_bytes": m.peak_rss.get(engine),
        "run_mem_bytes": m.run_growth.get(engine),
        "runs": [{"wall_s": x.wall_s, "output_tok_s": x.output_tok_s} for x in runs],
    }
    if runs and runs[0].collective_s is not None:  # tensor parallel: the share of the run spent communicating
        out["collective_share"] = statistics.median(x.collective_s / x.wall_s for x in runs)
        out["plan_share"] = statistics.median(x.plan_s / x.wall_s for x in runs)
    if baseline is not None and baseline in m.rounds:
        rs = ratios(runs, m.rounds[baseline])
        out["ratio_vs_baseline"] = statistics.median(rs)
        out["ratios_per_round"] = rs
        same = [a == b for x, y in zip(runs, m.rounds[baseline]) for a, b in zip(x.token_ids, y.token_ids)]
        out["same_tokens_as_baseline"] = sum(same) / len(same) if same else None
    return out
