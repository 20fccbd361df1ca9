"""The benchmark command line: parse, run, print the table, write results.json, table.md and the plots."""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import Any

from benchmarks.engines import canonical_name, engine_options, known_engines, literal, parse_option
from benchmarks.models import MODELS, cache_dir
from benchmarks.workloads import WORKLOADS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run named workloads on a named model through a set of engines; write results.json, "
        "table.md and PNG plots into --out.",
        epilog="example: python -m benchmarks --model llama-20m --workload decode-1,mixed --engines ch01,transformers",
    )
    p.add_argument("--model", default="llama-20m", help="a named model (see --list) or a model folder/checkpoint")
    p.add_argument(
        "--workload", "--workloads", default="decode-1,mixed", help="comma-separated workloads (see --list), or batch-N"
    )
    p.add_argument(
        "--engines",
        default="all",
        help="comma-separated: ch01, ch02, ..., transformers, llama.cpp; "
        "'all' = every chapter that exists + transformers (+ llama.cpp)",
    )
    p.add_argument("--baseline", default="transformers", help="the engine ratios are computed against")
    p.add_argument("--out", type=Path, default=None, help="output folder (default bench_out/<model>-<time>)")
    p.add_argument("--repeats", type=int, default=3, help="measured rounds; each runs every engine once (A B A B)")
    p.add_argument(
        "--warmup", default="16", help="warm-up round with outputs capped at this many tokens; 'full' or 0 (none)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default), float16")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument(
        "--kv-cache-memory",
        type=float,
        default=None,
        help="KV-cache bytes for every chapter that takes kv_cache_memory (default: the chapter's own on CPU, "
        "an equal share of half the free GPU memory on CUDA)",
    )
    p.add_argument(
        "--engine-opt",
        action="append",
        default=[],
        metavar="ENGINE:KEY=VALUE",
        help="an option for one engine, e.g. ch03:kv_cache_memory=2e8, transformers:batch_size=32",
    )
    p.add_argument(
        "--workload-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override every workload's field: num_requests=8, output_len=64, prompt_len=(16,64)",
    )
    p.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="ENGINE:KEY=V1,V2,...",
        help="run ENGINE once per value of KEY (e.g. a token budget); plotted against the value",
    )
    p.add_argument("--batch-sizes", default=None, help="add batch-N workloads for these N (e.g. 1,4,16)")
    p.add_argument("--no-bandwidth", action="store_true", help="skip measuring copy bandwidth (no roofline)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--list", action="store_true", help="list models, workloads and engines, and exit")
    return p


def parse_sweep(text: str) -> tuple[str, str, list[Any]]:
    engine, key, _ = parse_option(text.split("=", 1)[0] + "=0")
    values = [literal(v.strip()) for v in text.split("=", 1)[1].split(",") if v.strip()]
    return engine, key, values


def settings_from_args(args: argparse.Namespace):
    from benchmarks.runner import Settings

    engines = [canonical_name(e) for e in args.engines.split(",") if e.strip()]
    if engines == ["all"]:
        engines = known_engines()
    opts = engine_options(args.engine_opt)
    wl_opts = {}
    for text in args.workload_opt:
        key, eq, value = text.partition("=")
        if not eq:
            raise SystemExit(f"--workload-opt {text!r} is not KEY=VALUE")
        wl_opts[key.strip()] = literal(value.strip())
    sweeps = {}
    for text in args.sweep:
        engine, key, values = parse_sweep(text)
        sweeps[engine] = (key, values)
    workloads = [w.strip() for w in args.workload.split(",") if w.strip()]
    if args.batch_sizes:
        workloads += [f"batch-{int(b)}" for b in args.batch_sizes.split(",") if b.strip()]
    warmup = None if args.warmup == "full" else int(args.warmup)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    return Settings(
        model=args.model,
        workloads=workloads,
        engines=engines,
        baseline=args.baseline,
        repeats=args.repeats,
        warmup_tokens=warmup,
        device=args.device,
        dtype=dtype,
        threads=args.threads,
        engine_options=opts,
        workload_options=wl_opts,
        sweeps=sweeps,
        bandwidth=not args.no_bandwidth,
        kv_cache_memory=None if args.kv_cache_memory is None else int(args.kv_cache_memory),
    )


def list_all() -> str:
    lines = ["models (built with seeded random weights into " + str(cache_dir()) + " on first use):"]
    lines += [f"  {m.name:16} {m.description}" for m in MODELS.values()]
    lines += ["workloads:"] + [f"  {w.name:16} {w.description}" for w in WORKLOADS.values()]
    lines += ["  batch-N          N requests, prompt 64, 64 new tokens, submitted together"]
    lines += ["engines here: " + ", ".join(known_engines())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        print(list_all())
        return 0
    from benchmarks import plots, report, runner

    settings = settings_from_args(args)
    settings.command = "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv)
    out = args.out or Path("bench_out") / f"{Path(args.model).name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    results = runner.run(settings)
    print(report.render(results))
    report.write_json(results, out)
    report.write_table(results, out)
    made = [] if args.no_plots else plots.write_plots(results, out)
    print(f"\nwrote {out / 'results.json'}, {out / 'table.md'}" + "".join(f", {p}" for p in made), file=sys.stderr)
    return 0
