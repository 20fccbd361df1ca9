"""`python -m benchmarks.breakdown`: where a chapter engine's time goes on a workload, part by part.

Forward hooks time the model's modules while the engine runs the workload once:

- weights: the Linear layers of the decoder (q, k, v, o, gate, up, down projections, or their fused forms): matmuls
  whose cost per step is reading the weights plus work per token;
- logits: the output layer (lm_head), run on the rows that sample;
- attention: each attention layer minus its projections: storing K/V, reading them back, softmax;
- rest: everything else in the run (norms, rotary, embedding, sampling, scheduling, Python).

A module's time counts once, in the innermost timed module, so the parts add up to the run's wall time.
The hooks cost a few microseconds per module call: a small share of a step that takes milliseconds.

On a workload of one request (`decode-1`) it also splits a decode step, from the start of one forward pass to the
start of the next, into four parts that add up to the step time:

- weight reads: the bytes of every weight matrix the step multiplies by, at the read bandwidth measured here (a sum
  over a buffer larger than the caches, at the same thread count): the roofline, the least a step can take;
- matmuls over the roofline: the matmuls' measured time (weights + logits above) less those reads;
- attention: as above;
- host: everything else in the step, the fixed cost chapter 6 goes after (Python, the scheduler, sampling, norms,
  rotary, PyTorch's dispatch of every small op).

Beside them, the same steps timed with one hook per step instead of one per module ("step ms, no hooks") say what
the module hooks themselves cost. Chapter 6 on a CPU replays a decode step's layers in one C call
(nanovllm/models/decode_step.py), which has no modules to time; a step with hooks on its layers is never replayed,
so the timed run takes the module path, and "step ms, no hooks" is the replayed step: the difference also says what
the replay saves.

`--clock cpu` times everything in this thread's CPU time instead of wall time: on a shared machine at `--threads 1`
it leaves out the time other programs held the core, and it cannot see waiting (a sleep, another thread's work).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.engines import canonical_name, create_engine, engine_options
from benchmarks.measure import read_bandwidth
from benchmarks.models import resolve_model
from benchmarks.workloads import fit_to_context, get_spec, make_workload

PARTS = ("weights", "logits", "attention", "rest")
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}  # --clock: wall time, or this thread's CPU time
STEP_PARTS = ("reads", "over_roofline", "attention", "host")  # a decode step's split; they add up to its time


class PartTimer:
    """Adds up the time spent inside the model's Linear layers, its output layer and its attention layers."""

    def __init__(self, model: nn.Module, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.seconds = dict.fromkeys(PARTS[:-1], 0.0)  # "rest" is what the caller's total leaves over
        self.stack: list[list[Any]] = []  # [part, start, time spent in timed children]
        self.hooks = []
        self.weight_bytes = 0  # bytes of the matrices the timed matmuls read, each tensor once (a tied lm_head too)
        seen: set[int] = set()
        for name, module in model.named_modules():
            part = self.part_of(name, module)
            if part is not None:
                self.hooks.append(module.register_forward_pre_hook(lambda m, args, part=part: self.enter(part)))
                self.hooks.append(module.register_forward_hook(lambda m, args, out: self.leave()))
            if part in ("weights", "logits"):
                for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                    if t.data_ptr() not in seen:
                        seen.add(t.data_ptr())
                        self.weight_bytes += t.nbytes

    def remove(self) -> None:
        """Detach the hooks: the model runs untimed again."""
        for hook in self.hooks:
            hook.remove()

    @staticmethod
    def part_of(name: str, module: nn.Module) -> str | None:
        if name.endswith("lm_head"):
            return "logits"
        if isinstance(module, nn.Linear) or hasattr(module, "qweight"):  # a quantized Linear (chapter 7) is one too
            return "weights"
        if name.endswith("self_attn"):
            return "attention"
        return None

    def enter(self, part: str) -> None:
        self.stack.append([part, self.clock(), 0.0])

    def leave(self) -> None:
        part, start, children = self.stack.pop()
        elapsed = self.clock() - start
        self.seconds[part] += elapsed - children
        if self.stack:
            self.stack[-1][2] += elapsed


class StepClock:
    """Marks the start of every forward pass of the model (one pre-hook), with the parts' seconds so far when a
    PartTimer runs too: a step is the time from one pass's start to the next's, sampling and scheduling included."""

    def __init__(
        self, model: nn.Module, timer: PartTimer | None = None, clock: Callable[[], float] = time.perf_counter
    ):
        self.timer, self.clock = timer, clock
        self.marks: list[tuple[float, int, dict[str, float]]] = []  # (time, tokens in the pass, parts so far)
        self.hook = model.register_forward_pre_hook(self.mark)

    def mark(self, module: nn.Module, args: tuple) -> None:
        tokens = args[0].numel() if args and isinstance(args[0], torch.Tensor) else 0
        self.marks.append((self.clock(), tokens, dict(self.timer.seconds) if self.timer else {}))

    def remove(self) -> None:
        self.hook.remove()

    def steps(self, tokens: int | None = 1) -> list[dict[str, float]]:
        """Every whole step whose pass ran `tokens` tokens (None: any): its seconds and the parts' seconds in it.
        The last pass has no next start to end it, so it is left out."""
        out = []
        for (t0, n, before), (t1, _, after) in zip(self.marks, self.marks[1:]):
            if tokens is None or n == tokens:
                out.append({"seconds": t1 - t0, **{p: after[p] - before[p] for p in after}})
        return out


def breakdown(engine: Any, requests: list, clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Run the workload once through a chapter engine; seconds per part, forward passes and wall time (by `clock`),
    and the decode steps (one token a pass) with the seconds of each part in them."""
    model = engine.llm.model
    timer = PartTimer(model, clock)  # its hooks on the layers' modules keep chapter 6's replayed step off
    steps = StepClock(model, timer, clock)
    start = clock()
    result = engine.run(requests)
    wall = result.wall_s if clock is time.perf_counter else clock() - start
    steps.remove()
    timer.remove()
    seconds = dict(timer.seconds)
    seconds["rest"] = wall - sum(seconds.values())
    return {
        "wall_s": wall,
        "forward_passes": result.forward_passes,
        "seconds": seconds,
        "weight_bytes": timer.weight_bytes,
        "decode_steps": steps.steps(tokens=1) if len(requests) == 1 else [],  # chapter 1 has none: no cache
    }


def untimed_steps(engine: Any, requests: list, clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds of each decode step of a run with no module hooks (one pre-hook on the model marks the steps)."""
    steps = StepClock(engine.llm.model, clock=clock)
    engine.run(requests)
    steps.remove()
    return [s["seconds"] for s in steps.steps(tokens=1)]


def split_step(steps: list[dict[str, float]], weight_bytes: int, read_bytes_s: float) -> dict[str, float]:
    """The mean decode step of a run, split into parts that add up to it (milliseconds): weight reads at the
    read bandwidth, the matmuls' time over that, attention, and the host's rest."""
    n = len(steps)
    step = sum(s["seconds"] for s in steps) / n
    matmuls = sum(s["weights"] + s["logits"] for s in steps) / n
    attention = sum(s["attention"] for s in steps) / n
    reads = weight_bytes / read_bytes_s
    ms = {
        "step": step,
        "reads": reads,
        "over_roofline": matmuls - reads,  # below zero when the weights come from a cache (a tiny model)
        "attention": attention,
        "host": step - matmuls - attention,
        "matmuls": matmuls,
    }
    return {k: v * 1e3 for k, v in ms.items()}


def summarize_steps(rounds: list[dict[str, Any]], untimed: list[list[float]], read_bytes_s: float) -> dict[str, Any]:
    """One engine's decode step over its rounds: the split of the round with the median step time (its parts add up,
    as medians taken part by part would not), each round's step time, and the median step without module hooks."""
    splits = [split_step(r["decode_steps"], r["weight_bytes"], read_bytes_s) for r in rounds]
    median = sorted(splits, key=lambda s: s["step"])[(len(splits) - 1) // 2]
    weight_bytes = rounds[0]["weight_bytes"]
    return {
        **median,
        "steps_per_round": len(rounds[0]["decode_steps"]),
        "step_per_round": [s["step"] for s in splits],
        "untimed_step": statistics.median(sum(u) / len(u) * 1e3 for u in untimed),
        "weight_bytes": weight_bytes,
        "matmul_bytes_s": weight_bytes / (median["matmuls"] / 1e3),
    }


def render(rows: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| engine | wall s | passes | " + " | ".join(f"{p} s (share)" for p in PARTS) + " |",
        "|---|---:|---:|" + "---:|" * len(PARTS),
    ]
    for name, r in rows.items():
        parts = " | ".join(f"{r['seconds'][p]:.2f} ({r['seconds'][p] / r['wall_s']:.0%})" for p in PARTS)
        lines.append(f"| {name} | {r['wall_s']:.2f} | {r['forward_passes']} | {parts} |")
    if len(rows) == 2:
        (a, ra), (b, rb) = rows.items()
        ratio = " | ".join(f"{ra['seconds'][p] / rb['seconds'][p]:.2f}x" for p in PARTS)
        passes = ra["forward_passes"] / rb["forward_passes"]
        lines.append(f"| {a} / {b} | {ra['wall_s'] / rb['wall_s']:.2f}x | {passes:.2f}x | {ratio} |")
    return "\n".join(lines)


def render_steps(steps: dict[str, dict[str, Any]], read_bytes_s: float) -> str:
    """The decode-step table: one row per engine, then what each engine saved on the one before it."""
    gb = read_bytes_s / 1e9
    lines = [
        f"| engine | step ms | weight reads at {gb:.1f} GB/s | matmuls over the roofline | attention | host "
        "| matmuls ms (their GB/s) | step ms, no hooks |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in steps.items():
        parts = " | ".join(f"{s[p]:.2f} ({s[p] / s['step']:.0%})" for p in STEP_PARTS)
        mm = f"{s['matmuls']:.2f} ({s['matmul_bytes_s'] / 1e9:.1f})"
        lines.append(f"| {name} | {s['step']:.2f} | {parts} | {mm} | {s['untimed_step']:.2f} |")
    names = list(steps)
    for a, b in zip(names, names[1:]):
        sa, sb = steps[a], steps[b]
        parts = " | ".join(f"{sa[p] - sb[p]:+.2f}" for p in STEP_PARTS)
        untimed = sa["untimed_step"] - sb["untimed_step"]
        mm = sa["matmuls"] - sb["matmuls"]
        lines.append(f"| {a} − {b} | {sa['step'] - sb['step']:+.2f} | {parts} | {mm:+.2f} | {untimed:+.2f} |")
    return "\n".join(lines)


def steps_note(steps: dict[str, dict[str, Any]], read_bytes_s: float) -> str:
    first = next(iter(steps.values()))
    return (
        f"A decode step (mean of the {first['steps_per_round']} whole decode steps of the round with the median step "
        f"time), ms and share of the step. Weight reads: the {first['weight_bytes'] / 1e6:.1f} MB of weight matrices a "
        f"step multiplies by, at the read bandwidth measured here ({read_bytes_s / 1e9:.1f} GB/s, a sum over 256 MiB), "
        "the roofline. The four parts add up to the step. A row a − b is what b saved on a (ms)."
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.breakdown", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-20m")
    p.add_argument("--workload", default="mixed-64")
    p.add_argument("--engines", default="ch03,ch04", help="comma-separated chapter engines")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=1, help="rounds, each engine once per round in turn (A B A B)")
    p.add_argument("--clock", choices=list(CLOCKS), default="wall", help="wall time, or this thread's CPU time")
    p.add_argument("--engine-opt", action="append", default=[], metavar="ENGINE:KEY=VALUE")
    p.add_argument("--out", type=Path, default=None, help="folder to save breakdown.json and breakdown.md in")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    options = engine_options(args.engine_opt)
    model = resolve_model(args.model)
    spec = fit_to_context(get_spec(args.workload), model.max_model_len)
    requests = make_workload(spec, model.vocab_size, model.max_model_len, model.special_ids).requests
    warmup = make_workload(spec, model.vocab_size, model.max_model_len, model.special_ids, 1).capped(16).requests
    shared = {"max_model_len": spec.longest + 1}
    one_request = len(requests) == 1
    read_bytes_s = read_bandwidth() if one_request else None  # before the engines take their memory
    engines = {}
    for name in (canonical_name(e) for e in args.engines.split(",")):
        engines[name] = create_engine(name, model, "cpu", "float32", options.get(name, {}), shared)
        engines[name].run(warmup)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in engines}
    untimed: dict[str, list[list[float]]] = {name: [] for name in engines}
    for _ in range(max(args.repeats, 1)):
        for name, engine in engines.items():
            runs[name].append(breakdown(engine, requests, CLOCKS[args.clock]))
            if one_request:
                untimed[name].append(untimed_steps(engine, requests, CLOCKS[args.clock]))
    for engine in engines.values():
        engine.close()
    # the whole-run table shows each engine's round of median wall time; the JSON keeps every round's
    rows = {name: sorted(rs, key=lambda r: r["wall_s"])[(len(rs) - 1) // 2] for name, rs in runs.items()}
    clock = "" if args.clock == "wall" else ", times in this thread's CPU time"
    text = f"model {args.model}, workload {spec.name}, {torch.get_num_threads()} threads{clock}\n\n{render(rows)}"
    steps = {
        name: summarize_steps(runs[name], untimed[name], read_bytes_s)
        for name in engines
        if one_request and runs[name][0]["decode_steps"]
    }
    if steps:
        text += f"\n\n{steps_note(steps, read_bytes_s)}\n\n{render_steps(steps, read_bytes_s)}"
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        command = "python -m benchmarks.breakdown " + " ".join(argv if argv is not None else sys.argv[1:])
        (args.out / "breakdown.md").write_text(f"`{command}`\n\n{text}\n")
        saved = {"command": command, "model": args.model, "workload": spec.name, "threads": torch.get_num_threads()}
        saved["read_bandwidth_bytes_s"], saved["clock"] = read_bytes_s, args.clock
        engines_json = {
            name: {
                **{k: v for k, v in rows[name].items() if k != "decode_steps"},
                "rounds": [{"wall_s": r["wall_s"], "seconds": r["seconds"]} for r in runs[name]],
                **({"decode_step_ms": steps[name]} if steps else {}),
            }
            for name in engines
        }
        (args.out / "breakdown.json").write_text(json.dumps({**saved, "engines": engines_json}, indent=1))
        print(f"\nwrote {args.out / 'breakdown.md'}, {args.out / 'breakdown.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
