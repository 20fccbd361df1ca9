"""The script a worker process starts from (see benchmarks/worker.py): this tree's `benchmarks`, the worktree's code.

It imports nothing of the project before it has put the worktree (its working folder) first on sys.path for
`nanovllm` and `chapters`, and loaded this tree's `benchmarks` package from this folder, by path, under its own
name: the worktree has a `benchmarks` package of its own, which must never be the one imported.
"""

import importlib.util
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    # Python put this script's folder first; its modules (engines, models, ...) are not top-level modules
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    sys.path.insert(0, os.getcwd())
    # the project's editable install maps nanovllm and chapters to this tree whenever the worktree lacks a module
    for finder in list(sys.meta_path):
        mapping = getattr(sys.modules.get(getattr(finder, "__module__", "")), "MAPPING", None)
        if isinstance(mapping, dict) and {"nanovllm", "chapters"} & set(mapping):
            sys.meta_path.remove(finder)
    spec = importlib.util.spec_from_file_location(
        "benchmarks", HERE / "__init__.py", submodule_search_locations=[str(HERE)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules["benchmarks"] = package
    spec.loader.exec_module(package)
    from benchmarks.worker import serve

    return serve()


if __name__ == "__main__":
    raise SystemExit(main())
