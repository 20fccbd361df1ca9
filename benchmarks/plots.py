"""Plots of a benchmark result (PNG, matplotlib): the chapter ladder, and throughput/latency vs batch size or an
engine option (the token budget)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import matplotlib

from benchmarks.targets import pair_ratio

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LINE_ENGINES = ("transformers", "llama.cpp")  # drawn as horizontal lines across the chapter bars
VARIANT = re.compile(r"^(?P<engine>[^\[]+)\[(?P<key>[^=]+)=(?P<value>.+)\]$")


def _is_chapter(name: str) -> bool:
    return name[:2] == "ch" and name[2:4].isdigit()


def ladder(results: dict[str, Any], path: Path) -> Path | None:
    """One panel per workload: a bar per chapter (output tok/s), the other engines as horizontal lines."""
    wls = [(n, w) for n, w in results["workloads"].items() if any(_is_chapter(e) for e in w["engines"])]
    if any(not n.startswith("batch-") for n, _ in wls):  # batch-N workloads have their own plot
        wls = [(n, w) for n, w in wls if not n.startswith("batch-")]
    if not wls:
        return None
    fig, axes = plt.subplots(1, len(wls), figsize=(4.2 * len(wls) + 1, 4), squeeze=False)
    for ax, (name, wl) in zip(axes[0], wls):
        chapters = [(e, r["output_tok_s"]) for e, r in wl["engines"].items() if _is_chapter(e)]
        bars = ax.bar([c for c, _ in chapters], [v for _, v in chapters], color="tab:blue")
        prev = None
        for bar, (e, v) in zip(bars, chapters):  # the value, and the step from the chapter before (pairwise)
            step = (
                "" if prev is None else f"\n({pair_ratio(wl['engines'][e]['runs'], wl['engines'][prev]['runs']):.1f}x)"
            )
            text = (f"{v:.0f}" if v >= 10 else f"{v:.1f}") + step
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
            prev = e
        values = [v for _, v in chapters]
        for other, style in zip(LINE_ENGINES, ("--", ":")):
            if other in wl["engines"]:
                v = wl["engines"][other]["output_tok_s"]
                values.append(v)
                ax.axhline(
                    v, color="tab:red" if other == "transformers" else "tab:green", ls=style, label=f"{other} {v:.0f}"
                )
        if values and max(values) / max(min(values), 1e-9) > 30:
            ax.set_yscale("log")
        ax.set_title(f"{name} ({wl['num_requests']} req, {wl['output_tokens']} out tok)", fontsize=10)
        ax.set_ylabel("output tokens/s")
        if len(chapters) > 5 or any(len(c) > 6 for c, _ in chapters):  # long names (variants) slant
            plt.setp(ax.get_xticklabels(), rotation=30, ha="right", fontsize=8)
        ax.margins(y=0.15)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    m = results["machine"]
    fig.suptitle(
        f"chapter ladder: {results['model']['name']} {results['model']['dtype']}, {m['device']}, "
        f"{m['threads']} threads",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _latency(wl: dict[str, Any], row: dict[str, Any]) -> float:
    """Time per output token, ms: the streamed TPOT median, else the run's wall time over its mean output length."""
    if row.get("tpot_s"):
        return row["tpot_s"]["median"] * 1e3
    return row["wall_s"] / (wl["output_tokens"] / wl["num_requests"]) * 1e3


def _two_panels(
    series: dict[str, list[tuple[float, float, float]]], xlabel: str, title: str, path: Path, logx: bool
) -> Path:
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for label, pts in series.items():
        pts.sort()
        a.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        b.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=label)
    a.set_ylabel("output tokens/s")
    b.set_ylabel("ms per output token")
    b.set_title("TPOT median when streamed, else wall time / output length", fontsize=8)
    for ax in (a, b):
        ax.set_xlabel(xlabel)
        if logx:
            ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def batch_scaling(results: dict[str, Any], path: Path) -> Path | None:
    """Throughput and latency vs batch size, from the batch-N workloads (one line per engine)."""
    series: dict[str, list[tuple[float, float, float]]] = {}
    for name, wl in results["workloads"].items():
        if not re.fullmatch(r"batch-\d+", name):
            continue
        for e, row in wl["engines"].items():
            series.setdefault(e, []).append((int(name[6:]), row["output_tok_s"], _latency(wl, row)))
    if not series or max(len(v) for v in series.values()) < 2:
        return None
    return _two_panels(
        series,
        "batch size (requests submitted together)",
        f"throughput and latency vs batch size: {results['model']['name']}",
        path,
        logx=True,
    )


def option_sweeps(results: dict[str, Any], out: Path) -> list[Path]:
    """For each swept engine option (e.g. ch04's token budget): throughput and latency vs its value, a line per
    workload."""
    sweeps: dict[tuple[str, str], dict[str, list[tuple[float, float, float]]]] = {}
    for wl_name, wl in results["workloads"].items():
        for e, row in wl["engines"].items():
            m = VARIANT.match(e)
            if not m:
                continue
            try:
                x = float(m["value"])
            except ValueError:
                continue
            sweeps.setdefault((m["engine"], m["key"]), {}).setdefault(wl_name, []).append(
                (x, row["output_tok_s"], _latency(wl, row))
            )
    paths = []
    for (engine, key), series in sweeps.items():
        path = out / f"sweep_{engine}_{key}.png"
        paths.append(_two_panels(series, key, f"{engine}: throughput and latency vs {key}", path, logx=True))
    return paths


def write_plots(results: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    made = [ladder(results, out / "ladder.png"), batch_scaling(results, out / "batch_scaling.png")]
    return [p for p in made if p is not None] + option_sweeps(results, out)
