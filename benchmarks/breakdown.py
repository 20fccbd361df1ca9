"""`python -m benchmarks.breakdown`: where a chapter engine's time goes on a workload, part by part.

Forward hooks time the model's modules while the engine runs the workload once:

- weights: the Linear layers of the decoder (q, k, v, o, gate, up, down projections): matmuls whose
  cost per step is reading the weights plus work per token;
- logits: the output layer (lm_head), run on the rows that sample;
- attention: each attention layer minus its projections: storing K/V, reading them back, softmax;
- rest: everything else in the run (norms, rotary, embedding, sampling, scheduling, Python).

A module's time counts once, in the innermost timed module, so the parts add up to the run's wall time.
The hooks cost a few microseconds per module call: a small share of a step that takes milliseconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.engines import canonical_name, create_engine, engine_options
from benchmarks.models import resolve_model
from benchmarks.workloads import fit_to_context, get_spec, make_workload

PARTS = ("weights", "logits", "attention", "rest")


class PartTimer:
    """Adds up the time spent inside the model's Linear layers, its output layer and its attention layers."""

    def __init__(self, model: nn.Module, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.seconds = dict.fromkeys(PARTS[:-1], 0.0)  # "rest" is what the caller's total leaves over
        self.stack: list[list[Any]] = []  # [part, start, time spent in timed children]
        self.hooks = []
        for name, module in model.named_modules():
            part = self.part_of(name, module)
            if part is not None:
                self.hooks.append(module.register_forward_pre_hook(lambda m, args, part=part: self.enter(part)))
                self.hooks.append(module.register_forward_hook(lambda m, args, out: self.leave()))

    def remove(self) -> None:
        """Detach the hooks: the model runs untimed again."""
        for hook in self.hooks:
            hook.remove()

    @staticmethod
    def part_of(name: str, module: nn.Module) -> str | None:
        if name.endswith("lm_head"):
            return "logits"
        if isinstance(module, nn.Linear):
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


def breakdown(engine: Any, requests: list) -> dict[str, Any]:
    """Run the workload once through a chapter engine; seconds per part, forward passes and wall time."""
    timer = PartTimer(engine.llm.model)
    result = engine.run(requests)
    timer.remove()
    seconds = dict(timer.seconds)
    seconds["rest"] = result.wall_s - sum(seconds.values())
    return {"wall_s": result.wall_s, "forward_passes": result.forward_passes, "seconds": seconds}


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.breakdown", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-20m")
    p.add_argument("--workload", default="mixed-64")
    p.add_argument("--engines", default="ch03,ch04", help="comma-separated chapter engines")
    p.add_argument("--threads", type=int, default=None)
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
    rows = {}
    for name in (canonical_name(e) for e in args.engines.split(",")):
        engine = create_engine(name, model, "cpu", "float32", options.get(name, {}), shared)
        engine.run(warmup)
        rows[name] = breakdown(engine, requests)
        engine.close()
    text = f"model {args.model}, workload {spec.name}, {torch.get_num_threads()} threads\n\n{render(rows)}"
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        command = "python -m benchmarks.breakdown " + " ".join(argv if argv is not None else sys.argv[1:])
        (args.out / "breakdown.md").write_text(f"`{command}`\n\n{text}\n")
        saved = {"command": command, "model": args.model, "workload": spec.name, "threads": torch.get_num_threads()}
        (args.out / "breakdown.json").write_text(json.dumps({**saved, "engines": rows}, indent=1))
        print(f"\nwrote {args.out / 'breakdown.md'}, {args.out / 'breakdown.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
