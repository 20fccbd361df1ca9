"""Writes the exercise stubs in exercises/chNN/ from the reference code: same imports, signatures and docstrings.

    python tools/make_exercises.py          # (re)write every stub file
    python tools/make_exercises.py --check  # fail if a stub file differs from what would be written (CI)

A stub file mirrors one reference file: it imports what the reference imports, re-exports the
reference's other top-level names (so a task can call them), and replaces each task's body with
`raise NotImplementedError("chNN task N: ...")`.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exercises.tasks import TASKS, Task  # noqa: E402


def _signature_and_doc(lines: list[str], node: ast.FunctionDef) -> str:
    first = min([d.lineno for d in node.decorator_list] + [node.lineno])
    return "\n".join(lines[first - 1 : node.body[0].end_lineno])


def stub_source(module_name: str, tasks: list[Task]) -> str:
    module = importlib.import_module(module_name)
    source = inspect.getsource(module)
    tree = ast.parse(source)
    lines = source.splitlines()
    functions = {t.name: t for t in tasks if "." not in t.name}
    methods: dict[str, list[Task]] = defaultdict(list)  # class -> its method tasks
    for t in tasks:
        if "." in t.name:
            methods[t.name.split(".")[0]].append(t)
    chapter = tasks[0].chapter
    numbers = "|".join(f"task{t.number}" for t in sorted(tasks, key=lambda t: t.number))
    header = f'"""Exercises for {chapter}: your version of {module_name}.\n\n'
    header += "Fill in each function marked with a task; the docstring says what it computes.\n"
    header += f'Check your work with: pytest --impl=exercises -m {chapter} -k "{numbers}"\n"""\n'
    imports, others = [], []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.append(ast.get_source_segment(source, node))
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name not in functions:
            others.append(node.name)
        elif isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets):
            others.extend(t.id for t in node.targets)
    body = [header, *imports]
    if others:
        body.append(f"from {module_name} import {', '.join(others)}  # the rest of the file, as given")
    if methods:
        body.append(f"import {module_name} as _reference")
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in functions:
            task = functions[node.name]
            indent = " " * node.body[0].col_offset
            body.append(f'\n\n{_signature_and_doc(lines, node)}\n{indent}raise NotImplementedError("{task.message}")')
        elif isinstance(node, ast.ClassDef) and node.name in methods:
            wanted = {t.name.split(".")[1]: t for t in methods[node.name]}
            doc = ast.get_docstring(node) or ""
            body.append(
                f"\n\nclass {node.name}(_reference.{node.name}):\n"
                f'    """{doc} Yours: the methods below; the rest is inherited."""'
            )
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name in wanted:
                    indent = " " * item.body[0].col_offset
                    message = wanted[item.name].message
                    body.append(f'\n{_signature_and_doc(lines, item)}\n{indent}raise NotImplementedError("{message}")')
    return "\n".join(body) + "\n"


def expected_files() -> dict[Path, str]:
    by_file: dict[tuple[str, str], list[Task]] = defaultdict(list)
    for tasks in TASKS.values():
        for task in tasks:
            by_file[task.chapter, task.module].append(task)
    files = {}
    for (_, module_name), tasks in by_file.items():
        path = ROOT / (tasks[0].exercise_module.replace(".", "/") + ".py")
        files[path] = stub_source(module_name, tasks)
        files[path.parent / "__init__.py"] = f'"""Your exercise files for {tasks[0].chapter}."""\n'
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    stale = []
    for path, text in expected_files().items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.relative_to(ROOT))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print("out of date (run python tools/make_exercises.py):", *stale, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
