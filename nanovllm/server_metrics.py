"""The server's /metrics in Prometheus' text format: requests, KV blocks, tokens, first-token and per-token times."""

from __future__ import annotations

import threading
import time

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        self.sum, self.count = self.sum + value, self.count + 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return [
            *out,
            f'{name}_bucket{{le="+Inf"}} {self.count}',
            f"{name}_sum {self.sum}",
            f"{name}_count {self.count}",
        ]


class Metrics:
    """Counted as step outputs are handed out (the engine thread) and read by /metrics (the server's thread)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.ttft, self.tpot = Histogram(TTFT_BUCKETS), Histogram(TPOT_BUCKETS)
        self.tokens = self.requests = self.finished = 0
        self.seen: dict[int, tuple[float, float | None]] = {}  # request -> (submitted, last token time)

    def started(self, rid: int) -> None:
        with self.lock:
            self.requests += 1
            self.seen[rid] = (time.perf_counter(), None)

    def token(self, out) -> None:
        """A step output. One of a request not started here (a best_of candidate the engine forked, or one already
        released) adds its tokens to the count, and nothing else: a request's times are those of its first
        candidate, and one released is not tracked again."""
        now = time.perf_counter()
        with self.lock:
            self.tokens += len(out.new_token_ids)
            seen = self.seen.get(out.request_id)
            if seen is None:
                return
            self.finished += out.finished
            submitted, last = seen
            if out.new_token_ids:
                self.ttft.observe(now - submitted) if last is None else self.tpot.observe(now - last)
                self.seen[out.request_id] = (submitted, now)

    def ended(self, rid: int) -> None:
        with self.lock:
            self.seen.pop(rid, None)

    def render(self, llm) -> str:
        with llm.lock:
            running, waiting = len(llm.scheduler.running), len(llm.scheduler.waiting)
            free, total = llm.block_manager.num_free_blocks, llm.block_manager.num_blocks
        with self.lock:
            lines = [
                "# TYPE nanovllm_requests_running gauge", f"nanovllm_requests_running {running}",
                "# TYPE nanovllm_requests_waiting gauge", f"nanovllm_requests_waiting {waiting}",
                "# TYPE nanovllm_kv_blocks_used gauge", f"nanovllm_kv_blocks_used {total - free}",
                "# TYPE nanovllm_kv_blocks_free gauge", f"nanovllm_kv_blocks_free {free}",
                "# TYPE nanovllm_requests_total counter", f"nanovllm_requests_total {self.requests}",
                "# TYPE nanovllm_requests_finished_total counter", f"nanovllm_requests_finished_total {self.finished}",
                "# TYPE nanovllm_generation_tokens_total counter", f"nanovllm_generation_tokens_total {self.tokens}",
                "# TYPE nanovllm_time_to_first_token_seconds histogram",
                *self.ttft.lines("nanovllm_time_to_first_token_seconds"),
                "# TYPE nanovllm_time_per_output_token_seconds histogram",
                *self.tpot.lines("nanovllm_time_per_output_token_seconds"),
            ]  # fmt: skip
        return "\n".join(lines) + "\n"
