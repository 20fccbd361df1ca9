"""`python -m benchmarks`: the benchmark command."""

from benchmarks.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
