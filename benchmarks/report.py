"""Writes a benchmark result: results.json (the schema below), and a Markdown table, also printed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Keys every result has; tests/test_bench.py checks a result against them.
TOP_KEYS = (
    "schema",
    "created",
    "command",
    "machine",
    "model",
    "settings",
    "engines",
    "skipped",
    "workloads",
    "targets",
)
MACHINE_KEYS = ("platform", "processor", "cpu_count", "torch", "threads", "device", "copy_bandwidth_bytes_s")
WORKLOAD_KEYS = ("name", "num_requests", "prompt_tokens", "output_tokens", "engines")
ENGINE_KEYS = (
    "output_tok_s",
    "total_tok_s",
    "req_s",
    "wall_s",
    "ttft_s",
    "tpot_s",
    "ttft_source",
    "forward_passes",
    "peak_mem_bytes",
    "run_mem_bytes",
    "load_mem_bytes",
    "engine_mem_bytes",
    "kv_cache_bytes",
    "runs",
)


def write_json(results: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    return path


def _num(x: float | None, fmt: str = "{:.1f}") -> str:
    return "–" if x is None else fmt.format(x)


def _ms(d: dict[str, float] | None) -> str:
    return "–" if d is None else f"{d['median'] * 1e3:.1f} / {d['p99'] * 1e3:.1f}"


def _mib(b: int | None) -> str:
    if b is None:
        return "–"
    return f"{b / 2**20:.0f}" if b >= 10 * 2**20 or b == 0 else f"{b / 2**20:.2f}"


def header(results: dict[str, Any]) -> str:
    m, mod = results["machine"], results["model"]
    bw = m.get("copy_bandwidth_bytes_s")
    where = m.get("gpu") or m.get("processor") or "?"
    return (
        f"model {mod['name']} ({mod['params'] / 1e6:.2f}M params, {mod['dtype']}) on {m['device']} ({where}), "
        f"torch {m['torch']}, {m['threads']} threads, copy bandwidth "
        f"{_num(bw and bw / 2**30)} GiB/s; {results['settings']['repeats']} interleaved rounds, medians; "
        + (
            f"ratio = pairwise vs {results['settings']['baseline']}"
            if results["settings"]["baseline"]
            else "no ratios (pass --baseline ENGINE, one of the engines run)"
        )
    )


def table(results: dict[str, Any]) -> str:
    """One Markdown table: a row per workload and engine."""
    rows = [
        "| workload | engine | out tok/s | total tok/s | req/s | TTFT ms (med / p99) | TPOT ms (med / p99) "
        "| passes | engine mem MiB | KV MiB | roofline | ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for wl_name, wl in results["workloads"].items():
        for name, e in wl["engines"].items():
            roof = e.get("roofline_fraction")
            ratio = e.get("ratio_vs_baseline")
            rows.append(
                f"| {wl_name} | {name} | {_num(e['output_tok_s'])} | {_num(e['total_tok_s'])} | "
                f"{_num(e['req_s'], '{:.2f}')} | {_ms(e['ttft_s'])} | {_ms(e['tpot_s'])} | "
                f"{_num(e.get('forward_passes'), '{:.0f}')} | "
                f"{_mib(e['engine_mem_bytes'])} | {_mib(e['kv_cache_bytes'])} | "
                f"{'–' if roof is None else f'{roof:.0%}'} | {'–' if ratio is None else f'{ratio:.2f}x'} |"
            )
    return "\n".join(rows)


def targets_text(results: dict[str, Any]) -> str:
    lines = []
    for t in results.get("targets", []):
        mark = "met" if t["met"] else "NOT met"
        lines.append(
            f"- {t['engine']} vs {t['baseline']} on {t['workload']}: {t['ratio']:.2f}x "
            f"(target >= {t['min_ratio']}x): {mark}"
        )
    return "\n".join(lines)


LEGEND = (
    "out/total tok/s, req/s: medians over rounds. TTFT/TPOT: per request, streamed (or, for one request, from a "
    "max_tokens=1 run); – when the engine cannot tell. passes: forward passes of the model in one run (steps). "
    "engine mem: memory the engine added on loading, plus the "
    "most one run added. KV: the engine's KV cache (transformers: computed from its batches). roofline: weight "
    "bytes per decode step / step time / measured copy bandwidth (one-request workloads). ratio: output tok/s "
    "over the baseline's, median of the per-round pairs."
)


def render(results: dict[str, Any]) -> str:
    # engines at another commit run in worker processes: their peak is their own process's, not this one's
    workers = {n for n, info in results["engines"].items() if info.get("process") == "worker"}
    rows = [(n, e) for wl in results["workloads"].values() for n, e in wl["engines"].items()]
    peaks = [e["peak_mem_bytes"] for n, e in rows if n not in workers and e["peak_mem_bytes"] is not None]
    parts = [header(results), "", table(results), "", LEGEND]
    if peaks:
        where = "the other engines" if workers else "all engines"
        parts.append(f"Process peak memory ({where} loaded in one process): {max(peaks) / 2**20:.0f} MiB.")
    for name in sorted(workers):
        info = results["engines"][name]
        parts.append(f"{name}: commit {info['commit'][:10]}, run in its own process from {info['worktree']}.")
    if results.get("targets"):
        parts += ["", "ROADMAP targets:", targets_text(results)]
    if results.get("skipped"):
        parts += ["", *[f"skipped {k}: {v}" for k, v in results["skipped"].items()]]
    for wl_name, wl in results["workloads"].items():
        for name, e in wl["engines"].items():
            if e.get("collective_share") is not None:
                parts.append(
                    f"{wl_name}, {name}: rank 0 spent {e['collective_share']:.0%} of the run in collectives "
                    f"(all-reduces, the logits' gather, waiting for slower ranks), {e['plan_share']:.1%} in "
                    f"broadcasting step plans."
                )
    notes = [n for wl in results["workloads"].values() for n in wl.get("notes", [])]
    parts += [f"note: {n}" for n in notes]
    return "\n".join(parts)


def write_table(results: dict[str, Any], out: Path) -> Path:
    path = out / "table.md"
    path.write_text(render(results) + "\n")
    return path
