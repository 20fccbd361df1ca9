"""The benchmark command line: parse, run, print the table, write results.json, table.md and the plots.

Bad input (a model, workload, engine or git ref that does not exist) ends in one line on stderr and exit
status 2; a run where no engine could be measured ends with status 1. On a machine with 2 CPUs or fewer,
--threads defaults to 1 (and the command says so): there a second torch thread mostly waits for a core
that something else holds, and runs read 10-30x slower than with one.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path
from typing import Any

from benchmarks import BenchError, models
from benchmarks.engines import (
    canonical_name,
    check_engine,
    engine_options,
    inline_options,
    known_engines,
    literal,
    parse_option,
    split_inline,
    split_top_level,
)
from benchmarks.models import MODELS, cache_dir, check_model
from benchmarks.workloads import WORKLOADS, get_spec

PROG = "python -m benchmarks"
FEW_CPUS = 2  # at or below this many CPUs, --threads defaults to 1


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Run named workloads on a named model through a set of engines; write results.json, "
        "table.md and PNG plots into --out.",
        epilog=f"example: {prog} --model llama-20m --workload decode-1,mixed --engines ch01,transformers; "
        f"a chapter at a git commit beside today's: {prog} --engines ch04,ch04@HEAD~1 (A/B in one run)",
    )
    p.add_argument("--model", default="llama-20m", help="a named model (see --list) or a model folder/checkpoint")
    p.add_argument(
        "--workload", "--workloads", default="decode-1,mixed", help="comma-separated workloads (see --list), or batch-N"
    )
    p.add_argument(
        "--engines",
        default="all",
        help="comma-separated: ch01, ch02, ..., transformers, llama.cpp, llama.cpp-TYPE (a quantized GGUF: q8_0, "
        "q4_0, ...), or chNN@REF (chapter NN at git commit REF, in its own process); ENGINE[KEY=VALUE,...] runs an "
        "engine with options of its own, so one engine can run twice (ch07,ch07[quantization=int8]); "
        "'all' = every chapter that exists + transformers (+ llama.cpp)",
    )
    p.add_argument(
        "--baseline",
        default=None,
        help="the engine ratios are computed against (default: transformers when it runs, else the first engine; "
        "'none': no ratios)",
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default bench_out/<model>-<time>)")
    p.add_argument(
        "--repeats", type=positive_int, default=3, help="measured rounds; each runs every engine once (A B A B)"
    )
    p.add_argument(
        "--warmup", default="16", help="warm-up round with outputs capped at this many tokens; 'full' or 0 (none)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default), float16")
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help=f"torch threads (default: 1 on a machine with {FEW_CPUS} CPUs or fewer, else torch's own choice; "
        "use 1 on a shared machine)",
    )
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
    p.add_argument(
        "--progress-every",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="a run longer than this tells how far it has got (requests done), every SECONDS",
    )
    p.add_argument("--no-bandwidth", action="store_true", help="skip measuring copy bandwidth (no roofline)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--list", action="store_true", help="list models, workloads and engines, and exit")
    return p


def parse_sweep(text: str) -> tuple[str, str, list[Any]]:
    if "=" not in text:
        raise BenchError(f"--sweep {text!r} is not ENGINE:KEY=V1,V2,...")
    engine, key, _ = parse_option(text.split("=", 1)[0] + "=0")
    values = [literal(v.strip()) for v in text.split("=", 1)[1].split(",") if v.strip()]
    return engine, key, values


def torch_has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def default_threads(log=lambda m: print(m, file=sys.stderr)) -> int | None:
    """1 on a machine with few CPUs (said in the output), else None (torch's own choice)."""
    cpus = os.cpu_count() or 1
    if cpus > FEW_CPUS:
        return None
    log(f"{cpus} CPUs here: --threads 1 by default (on a small or shared machine a second thread mostly waits)")
    return 1


def settings_from_args(args: argparse.Namespace, log=lambda m: print(m, file=sys.stderr)):
    """The run's Settings; a BenchError (or ValueError, FileNotFoundError) in one line for anything that does not
    exist here, before any model is built or engine loaded."""
    from benchmarks.runner import Settings, variant_name

    check_model(args.model)
    engines = [canonical_name(e) for e in split_top_level(args.engines)]  # commas inside ENGINE[...] stay
    if engines == ["all"]:
        engines = known_engines()
    if not engines:
        raise BenchError("--engines names no engine")
    for name in engines:
        check_engine(name)
    opts = engine_options(args.engine_opt)
    for name in engines:  # ch07[k=v]: the engine's own options (ch07:...), then the name's, then its --engine-opt
        if inline_options(name):
            plain = split_inline(name)[0]
            opts[name] = {**opts.get(plain, {}), **inline_options(name), **opts.get(name, {})}
    wl_opts = {}
    for text in args.workload_opt:
        key, eq, value = text.partition("=")
        if not eq:
            raise BenchError(f"--workload-opt {text!r} is not KEY=VALUE")
        wl_opts[key.strip()] = literal(value.strip())
    sweeps = {}
    for text in args.sweep:
        engine, key, values = parse_sweep(text)
        if engine not in engines:  # it would be silently left out of the run
            raise BenchError(f"--sweep {text!r}: {engine} is not among --engines ({', '.join(engines)})")
        if not values:
            raise BenchError(f"--sweep {text!r} gives no values")
        sweeps[engine] = (key, values)
    runs = [n for n in engines if n not in sweeps] + [
        variant_name(n, k, v) for n, (k, vs) in sweeps.items() for v in vs
    ]
    if args.baseline is not None and args.baseline.lower() != "none" and canonical_name(args.baseline) not in runs:
        raise BenchError(f"--baseline {args.baseline} is none of the engines run ({', '.join(runs)}), nor 'none'")
    if args.kv_cache_memory is not None and not args.kv_cache_memory >= 1:
        raise BenchError(f"--kv-cache-memory must be a number of bytes >= 1, got {args.kv_cache_memory}")
    if args.device.startswith("cuda") and not torch_has_cuda():
        raise BenchError(f"--device {args.device}: no CUDA device here (this torch build or machine has none)")
    workloads = [w.strip() for w in args.workload.split(",") if w.strip()]
    if args.batch_sizes:
        workloads += [f"batch-{int(b)}" for b in args.batch_sizes.split(",") if b.strip()]
    if not workloads:
        raise BenchError("--workload names no workload")
    for w in workloads:
        get_spec(w).with_options(**wl_opts)
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
        threads=args.threads if args.threads is not None else default_threads(log),
        engine_options=opts,
        workload_options=wl_opts,
        sweeps=sweeps,
        bandwidth=not args.no_bandwidth,
        kv_cache_memory=None if args.kv_cache_memory is None else int(args.kv_cache_memory),
        progress_s=args.progress_every,
    )


def list_all() -> str:
    """Models (built ones first; stories260K last, as it needs ../shared), workloads, engines."""
    lines = ["models (built with seeded random weights into " + str(cache_dir()) + " on first use):"]
    lines += [f"  {m.name:16} {m.description}" for m in MODELS.values() if m.name != "stories260k"]
    where = "here" if models.STORIES260K.exists() else "absent here"
    lines += [f"  {'stories260k':16} {MODELS['stories260k'].description} (needs ../shared: {where})"]
    lines += ["workloads:"] + [f"  {w.name:16} {w.description}" for w in WORKLOADS.values()]
    lines += ["  batch-N          N requests, prompt 64, 64 new tokens, submitted together"]
    lines += ["engines here: " + ", ".join(known_engines())]
    lines += ["  chNN@REF         chapter NN at git commit REF (a branch, tag, HEAD~1, ...), in its own process"]
    lines += ["  llama.cpp-TYPE   llama.cpp on a GGUF of that type: q8_0, q4_0, f16, ... (llamacpp-q8_0 works too)"]
    lines += ["  llama-server     llama.cpp's own server, batching (--parallel = max_num_seqs); llama-server-q8_0 too"]
    lines += ["  ENGINE[K=V,...]  an engine with options of its own, e.g. ch07[quantization=int8] beside ch07"]
    return "\n".join(lines)


def positive_int(text: str) -> int:
    """argparse's type for a count that must be at least 1 (its error then names the option)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.list:
        print(list_all())
        return 0
    try:
        settings = settings_from_args(args)
    except (BenchError, FileNotFoundError, ValueError) as e:  # what the user asked for: one line, no traceback
        return error(prog, e)
    from benchmarks import plots, report, runner
    from nanovllm.errors import ModelFormatError

    settings.command = f"{prog} " + " ".join(sys.argv[1:] if argv is None else argv)
    out = args.out or Path("bench_out") / f"{Path(args.model).name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    made_out = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)  # now, not after a run of many minutes
        probe = out / ".write-check"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        return error(prog, f"cannot write results to {out}: {e.strerror or e}")

    def no_results(code: int) -> int:  # leave no empty folder behind
        if made_out and not any(out.iterdir()):
            out.rmdir()
        return code

    try:
        results = runner.run(settings)
    except (BenchError, FileNotFoundError, ModelFormatError) as e:  # a model or engine that cannot load as asked
        return no_results(error(prog, e))
    if not results["engines"]:
        why = "; ".join(f"{k}: {v}" for k, v in results["skipped"].items()) or "no engine ran"
        print(f"{prog}: nothing was measured ({why})", file=sys.stderr)
        return no_results(1)
    print(report.render(results))
    report.write_json(results, out)
    report.write_table(results, out)
    made = [] if args.no_plots else plots.write_plots(results, out)
    print(f"\nwrote {out / 'results.json'}, {out / 'table.md'}" + "".join(f", {p}" for p in made), file=sys.stderr)
    return 0


def error(prog: str, e: BaseException | str) -> int:
    print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
