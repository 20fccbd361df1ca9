"""Helpers every chapter notebook shares: find the repository, pick the model, show real source code.

A notebook runs with notebooks/ as its working directory, so `import _common` works from any of them.
Importing it puts the repository root on sys.path, which makes `nanovllm`, `chapters` and `exercises`
importable without installing anything.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The models a notebook may use, best first. "default" is the project's own trained model, shipped in the
# package; stories260K lives beside the repository (a learner's clone may not have it); the tiny seeded
# model is always there but has random weights, so its text is gibberish.
DEFAULT_MODEL = ROOT / "nanovllm" / "assets" / "default"
STORIES260K = ROOT.parent / "shared" / "models" / "stories260K"
TINY_MODEL = ROOT / "tests" / "models" / "tiny-llama"


def pick_model(verbose: bool = True) -> str:
    """The model the notebooks run: 'default' if it is installed, else stories260K, else tiny-llama."""
    if (DEFAULT_MODEL / "config.json").is_file():
        name, why = "default", "the project's default model (nanovllm/assets/default)"
    elif STORIES260K.is_dir():
        name, why = str(STORIES260K), "stories260K, a real 260K-parameter Llama trained on TinyStories"
    else:
        name, why = str(TINY_MODEL), "tiny-llama: random weights, so expect gibberish text"
    if verbose:
        print(f"model: {why}")
    return name


def is_stories260k(model: str) -> bool:
    return Path(model).resolve() == STORIES260K.resolve()


class Source:
    """Source code rendered as a Markdown code block: highlighted in Jupyter and in the book alike.

    Markdown (not HTML) keeps the output independent of the highlighter's version, so nbval can check
    that a stored notebook still shows the current code.
    """

    def __init__(self, code: str, title: str = "", folded: bool = False, language: str = "python"):
        self.code, self.title, self.folded, self.language = code.rstrip() + "\n", title, folded, language

    def _repr_markdown_(self) -> str:
        block = f"```{self.language}\n{self.code}```"
        if self.folded:
            return f"<details><summary>{self.title}</summary>\n\n{block}\n\n</details>"
        return f"*{self.title}*\n\n{block}" if self.title else block

    def __repr__(self) -> str:
        return self.code


def unjit(obj):
    """The Python function inside a @triton.jit function (an object of Triton's that keeps it as .fn)."""
    return obj.fn if type(obj).__module__.startswith("triton.") else obj


def where(obj) -> str:
    """'path/to/file.py' of a function, class or module, relative to the repository."""
    return Path(inspect.getsourcefile(inspect.unwrap(unjit(obj)))).resolve().relative_to(ROOT).as_posix()


def show(obj, folded: bool = False, title: str | None = None) -> Source:
    """The real source of a function, class or method, as it is in the repository right now."""
    obj = unjit(obj)
    code = textwrap.dedent(inspect.getsource(obj))
    return Source(code, title if title is not None else f"{obj.__qualname__} — {where(obj)}", folded)


def show_c(path: str, name: str) -> Source:
    """A C function of the repository by name (the comment above it, its signature and body), as the book shows it.

    The lines come from book/hooks.py's resolver, the one the book's `--8<-- "file.c:name"` includes use.
    """
    spec = importlib.util.spec_from_file_location("book_hooks", ROOT / "book" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    start, end = hooks.resolve(ROOT / path, name)
    lines = (ROOT / path).read_text(encoding="utf-8").splitlines()[start - 1 : end]
    return Source("\n".join(lines), f"{name} — {path}", language="c")


def _split(obj) -> tuple[list[str], list[str], list[str]]:
    """A function's source as (decorators + signature, docstring, body after the docstring)."""
    source = textwrap.dedent(inspect.getsource(unjit(obj)))
    doc = ast.parse(source).body[0].body[0]
    lines = source.splitlines()
    return lines[: doc.lineno - 1], lines[doc.lineno - 1 : doc.end_lineno], lines[doc.end_lineno :]


def statement(obj) -> str:
    """A function's signature and docstring, followed by `...`: what a task asks for, not how."""
    signature, doc, _ = _split(obj)
    return "\n".join(signature + doc + ["    ..."]) + "\n"


def solution(obj) -> str:
    """A function's signature and body, without the docstring (the statement above it shows that)."""
    signature, _, body = _split(obj)
    return "\n".join(signature + body) + "\n"


def show_task(chapter: str, number: int):
    """A task's statement (signature and docstring), then its reference solution folded away.

    Returns a displayable object; in a notebook cell, leave it as the cell's last expression.
    """
    from exercises.tasks import TASKS

    task = next(t for t in TASKS[chapter] if t.number == number)
    func = importlib.import_module(task.module)
    for part in task.name.split("."):  # a method task is named "Class.method"
        func = getattr(func, part)
    mine = task.exercise_module.replace(".", "/") + ".py"
    head = Source(statement(func), f"{chapter} task {task.number}: {task.name} — write it in {mine}")
    body = Source(solution(func), f"The reference solution ({where(func)}): try the task first", True)
    return _Both(head, body)


class _Both:
    def __init__(self, *parts: Source):
        self.parts = parts

    def _repr_markdown_(self) -> str:
        return "\n\n".join(p._repr_markdown_() for p in self.parts)

    def __repr__(self) -> str:
        return "\n".join(repr(p) for p in self.parts)
