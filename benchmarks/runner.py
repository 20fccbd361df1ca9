"""Runs a benchmark end to end: model, engines, workloads, measurement; returns the result as a JSON-ready dict."""

from __future__ import annotations

import datetime
import gc
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks.engines import Engine, EngineUnavailable, canonical_name, create_engine, preload
from benchmarks.measure import PeakMemory, copy_bandwidth, measure, summarize
from benchmarks.models import ResolvedModel, resolve_model
from benchmarks.targets import check_targets
from benchmarks.workloads import Request, fit_to_context, get_spec, make_workload

SCHEMA = "nanovllm-bench/1"


@dataclass
class Settings:
    model: str = "llama-20m"
    workloads: list[str] = field(default_factory=lambda: ["decode-1", "mixed"])
    engines: list[str] = field(default_factory=lambda: ["ch01", "transformers"])
    baseline: str | None = None  # None: transformers when it runs, else the first engine; "none": no ratios
    repeats: int = 3
    warmup_tokens: int | None = 16  # None: warm up on the full workload; 0: no warm-up
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    engine_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # engine -> {key: value}
    workload_options: dict[str, Any] = field(default_factory=dict)  # applied to every workload
    sweeps: dict[str, tuple[str, list[Any]]] = field(default_factory=dict)  # engine -> (key, values)
    # KV-cache memory for every chapter that takes `kv_cache_memory` (None: the chapter's default on CPU;
    # on CUDA an equal share of half the free memory, since all engines live in one process)
    kv_cache_memory: int | None = None
    bandwidth: bool = True  # measure copy bandwidth (for the decode roofline)
    progress_s: float = 30.0  # a run longer than this logs how far it has got, every progress_s
    command: str = ""  # the command line that asked for this run (recorded in the result)


def variant_name(engine: str, key: str, value: Any) -> str:
    return f"{engine}[{key}={value}]"


def plan_engines(s: Settings) -> list[tuple[str, str, dict[str, Any]]]:
    """(display name, engine, options) for every engine to load; a swept engine becomes one variant per value.
    A chapter at a commit (ch04@REF) takes the chapter's options (ch04:...), then its own (ch04@REF:...)."""
    plan = []
    for raw in s.engines:
        name = canonical_name(raw)
        base = name.partition("@")[0]
        opts = {**(s.engine_options.get(base, {}) if base != name else {}), **s.engine_options.get(name, {})}
        if name in s.sweeps:
            key, values = s.sweeps[name]
            plan += [(variant_name(name, key, v), name, {**opts, key: v}) for v in values]
        else:
            plan.append((name, name, opts))
    return plan


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(s: Settings, bandwidth: float | None) -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "processor": cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": s.device,
        "device_type": s.device.split(":")[0],
        "copy_bandwidth_bytes_s": bandwidth,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if s.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(s.device)
        info["cuda"] = torch.version.cuda
    return info


def weight_bytes_per_step(model: ResolvedModel, dtype: str) -> int:
    """Bytes of weights one decode step reads: every matrix, and the embedding once (as the LM head when tied;
    an untied embedding is only indexed, one row per token, so it is not counted)."""
    cfg = model.config
    e, v = cfg["hidden_size"], cfg["vocab_size"]
    from benchmarks.models import param_count

    params = param_count(cfg) - (0 if cfg.get("tie_word_embeddings") else v * e)
    return params * torch.finfo(getattr(torch, dtype)).bits // 8


def run(s: Settings, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> dict[str, Any]:
    """Run the benchmark `s` describes (torch's thread count is set for the run and restored after it)."""
    threads = torch.get_num_threads()
    try:
        if s.threads:
            torch.set_num_threads(s.threads)
        return _run(s, log)
    finally:
        torch.set_num_threads(threads)


def _run(s: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    model = resolve_model(s.model)
    bandwidth = copy_bandwidth(s.device) if s.bandwidth else None
    if bandwidth:
        log(f"copy bandwidth: {bandwidth / 2**30:.1f} GiB/s")
    engines: list[Engine] = []
    plan = plan_engines(s)
    for _, name, _ in plan:
        preload(name)
    specs = [fit_to_context(get_spec(w).with_options(**s.workload_options), model.max_model_len) for w in s.workloads]
    shared = {"max_model_len": max(sp.longest for sp in specs) + 1, "kv_cache_memory": s.kv_cache_memory}
    if shared["kv_cache_memory"] is None and s.device.startswith("cuda"):
        chapters = sum(1 for _, name, _ in plan if name[:2] == "ch")
        shared["kv_cache_memory"] = int(torch.cuda.mem_get_info(s.device)[0] * 0.5 / max(chapters, 1))
    try:
        return _measure_all(s, model, plan, shared, bandwidth, engines, log)
    finally:
        for e in engines:
            e.close()


def choose_baseline(wanted: str | None, loaded: list[str], log: Callable[[str], None]) -> str | None:
    """The engine ratios are taken against: the one asked for, else transformers when it ran, else the first engine."""
    if wanted is None:
        return "transformers" if "transformers" in loaded else (loaded[0] if loaded else None)
    if wanted.lower() == "none":
        return None
    baseline = canonical_name(wanted)
    if baseline not in loaded:
        log(
            f"baseline {baseline} was not run, so no ratios; pass --baseline with one of the engines run "
            f"({', '.join(loaded) or 'none'})"
        )
        return None
    return baseline


def _measure_all(
    s: Settings,
    model: ResolvedModel,
    plan: list[tuple[str, str, dict[str, Any]]],
    shared: dict[str, Any],
    bandwidth: float | None,
    engines: list[Engine],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Load the engines (into `engines`, which the caller closes) and measure every workload."""
    loaded: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for display, name, opts in plan:
        log(f"loading {display} ...")
        try:
            with PeakMemory(s.device) as mem:  # loading, and one tiny request that touches every weight
                engine = create_engine(name, model, s.device, s.dtype, opts, shared)
                try:
                    engine.run([Request([3, 4, 5, 6, 7, 8, 9, 10], 2)])
                except BaseException:
                    engine.close()  # a worker process must not outlive the run
                    raise
        except EngineUnavailable as e:
            skipped[display] = str(e)
            log(f"skipping {display}: {e}")
            continue
        engines.append(engine)
        engine.name = display
        # an engine in a worker process measures its own loading; the rest are measured here
        load_mem = engine.load_mem_bytes if engine.load_mem_bytes is not None else mem.growth
        loaded[display] = {**engine.info(), "load_mem_bytes": load_mem}
        log(f"loaded {display}")
    baseline = choose_baseline(s.baseline, list(loaded), log)
    step_bytes = weight_bytes_per_step(model, s.dtype)
    workloads: dict[str, Any] = {}
    for wl_name in s.workloads:
        spec = get_spec(wl_name).with_options(**s.workload_options)
        log(f"workload {spec.name}: {spec.description}")

        def make(variant: int, spec=spec):
            return make_workload(spec, model.vocab_size, model.max_model_len, model.special_ids, variant)

        m = measure(engines, make, s.repeats, s.warmup_tokens, s.device, log, s.progress_s)
        per_engine = {}
        for e in engines:
            row = summarize(m, e.name, baseline)
            row["kv_cache_bytes"] = e.kv_cache_bytes(m.workload.requests)
            row["load_mem_bytes"] = loaded[e.name]["load_mem_bytes"]
            parts = [row["load_mem_bytes"], row["run_mem_bytes"]]
            row["engine_mem_bytes"] = None if parts[0] is None else sum(p or 0 for p in parts)
            if len(m.workload.requests) == 1 and bandwidth:
                step = row["tpot_s"]["median"] if row["tpot_s"] else row["wall_s"] / m.workload.output_tokens
                row["step_time_s"] = step
                row["roofline_fraction"] = step_bytes / step / bandwidth
            per_engine[e.name] = row
        workloads[spec.name] = {**m.workload.summary(), "engines": per_engine}
        gc.collect()
    results = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": s.command or " ".join(sys.argv),
        "machine": machine_info(s, bandwidth),
        "model": {**model.summary(), "dtype": s.dtype, "weight_bytes_per_decode_step": step_bytes},
        "settings": {
            "repeats": s.repeats,
            "warmup_tokens": s.warmup_tokens,
            "baseline": baseline,
            "engine_options": s.engine_options,
            "chapter_settings": shared,
            "workload_options": s.workload_options,
            "sweeps": {k: {"key": key, "values": v} for k, (key, v) in s.sweeps.items()},
            "method": "warm-up round (outputs capped at warmup_tokens), then `repeats` rounds running "
            "every engine in turn; fresh token ids each round, identical for all engines in a "
            "round; medians over rounds; ratio = median of per-round output tok/s ratios",
        },
        "engines": loaded,
        "skipped": skipped,
        "workloads": workloads,
    }
    results["targets"] = check_targets(results)
    return results
