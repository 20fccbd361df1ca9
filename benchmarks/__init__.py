"""The course-wide benchmark: every chapter, transformers and llama.cpp on named models and seeded workloads.

    python -m benchmarks --model llama-20m --workload decode-1,mixed --engines all --out bench_out/run1

It sits on top of the project (like tests/): it imports `chapters` and `nanovllm`, and
nothing imports it. See `python -m benchmarks --help` and `--list`.
"""


class BenchError(ValueError):
    """A problem with what the benchmark was asked to do, told in one line (the CLI prints it, no traceback)."""
