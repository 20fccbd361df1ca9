"""`python -m benchmarks.decode_step`: chapter 6's decode step replayed by one C call against the module path.

One engine, one process: the same model with its DecodeStepPlan and without it (model.decode_plan = None, which is
the module path with the same kernels), rounds interleaved (A B A B), one request decoding. The plan is not an
engine option (it goes with the C matmul kernel), so this is how the two are compared on equal terms: the same
weights, the same KV pool, the same threads. Prints a table and saves it (with the JSON) under --out.

    python -m benchmarks.decode_step --model llama-134m --quantization none,int8,int4 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.models import resolve_model


def measure(model: str, quantization: str | None, rounds: int, tokens: int) -> dict:
    from nanovllm import LLM, SamplingParams

    llm = LLM(str(resolve_model(model).path), quantization=quantization)
    plan = llm.model.decode_plan
    if plan is None:
        from nanovllm.models.decode_step import decode_step_unsupported

        raise SystemExit(f"{model} has no replayed step here: {decode_step_unsupported(llm.model)}")
    prompt = [1] + [(37 * i) % 1000 + 3 for i in range(31)]
    params = SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0)
    runs: dict[str, list[float]] = {"module path": [], "one call a step": []}
    outputs = {}
    llm.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)  # warm-up
    for _ in range(rounds):
        for name, active in (("module path", None), ("one call a step", plan)):
            llm.model.decode_plan = active
            start = time.perf_counter()
            outputs[name] = llm.generate([prompt], params, use_tqdm=False)[0]["token_ids"]
            runs[name].append(tokens / (time.perf_counter() - start))
    llm.model.decode_plan = plan
    pairs = [b / a for a, b in zip(runs["module path"], runs["one call a step"])]
    return {
        "quantization": quantization or "none",
        "tok_s": {name: statistics.median(v) for name, v in runs.items()},
        "rounds": runs,
        "ratio": statistics.median(pairs),
        "same_tokens": outputs["module path"] == outputs["one call a step"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decode_step", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama-134m")
    parser.add_argument("--quantization", default="none,int8,int4", help="comma-separated: none, int8, int4, ...")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128, help="tokens each run decodes")
    parser.add_argument("--out", type=Path, help="folder to save decode_step.json and decode_step.md in")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for scheme in args.quantization.split(","):
        rows.append(measure(args.model, None if scheme == "none" else scheme, args.rounds, args.tokens))
    lines = [
        f"`{' '.join(['python -m benchmarks.decode_step', *(argv if argv is not None else sys.argv[1:])])}`",
        "",
        f"model {args.model}, one request decoding {args.tokens} tokens, {args.threads} threads, {args.rounds} "
        "interleaved rounds; out tok/s, medians; ratio: the median of the rounds' pairs",
        "",
        "| weights | module path tok/s | one call a step tok/s | ratio | same tokens |",
        "|---|---:|---:|---:|---|",
    ]
    for r in rows:
        t = r["tok_s"]
        lines.append(
            f"| {r['quantization']} | {t['module path']:.1f} | {t['one call a step']:.1f} | {r['ratio']:.2f}x "
            f"| {'yes' if r['same_tokens'] else 'NO'} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "decode_step.md").write_text(table + "\n")
        (args.out / "decode_step.json").write_text(
            json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=1)
        )
        print(f"wrote {args.out / 'decode_step.md'}, {args.out / 'decode_step.json'}")
    return 0 if all(r["same_tokens"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
