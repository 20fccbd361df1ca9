"""The book: every code include points at code that exists, the tasks are numbered as in exercises/tasks.py,
the notebooks are stored executed, and `mkdocs build --strict` passes with no warning."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from exercises.tasks import TASKS

MARKDOWN = sorted([*(ROOT / "book").rglob("*.md"), *(ROOT / "solutions").glob("*.md")])
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def load_hooks():
    spec = importlib.util.spec_from_file_location("book_hooks", ROOT / "book" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = load_hooks()


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@pytest.mark.parametrize("page", MARKDOWN, ids=rel)
def test_every_snippet_include_points_at_an_existing_file_and_section(page):
    text = page.read_text(encoding="utf-8")
    includes = hooks.snippet_includes(text)
    # A scissors line the hook does not recognise (the multi-line block form, say) would not be resolved by name.
    scissors = [i for i, line in enumerate(text.splitlines(), 1) if re.match(r"\s*-+8<-+", line)]
    assert scissors == [i for i, _ in includes], f'{rel(page)}: write each include on one line: --8<-- "file:name"'
    for line, target in includes:
        where = f"{rel(page)}:{line}: {target!r}"
        named = hooks.NAMED.match(target)
        ranged = re.match(r"^(?P<path>.+?)(?::(?P<start>\d+))?(?::(?P<end>\d+))?$", target)
        path = ROOT / (named or ranged)["path"]
        assert path.resolve().is_relative_to(ROOT), f"{where}: outside the repository"
        assert path.is_file(), f"{where}: no such file"
        if named:
            try:
                start, end = hooks.resolve(path, named["name"])
            except KeyError as e:
                pytest.fail(f"{where}: {e}")
            assert 1 <= start <= end
        elif ranged["start"]:
            n_lines = len(path.read_text(encoding="utf-8").splitlines())
            end = int(ranged["end"]) if ranged["end"] else n_lines
            assert 1 <= int(ranged["start"]) <= end <= n_lines, f"{where}: outside the file's {n_lines} lines"


def test_named_includes_resolve_to_whole_definitions():
    """The resolver returns decorators through the last line, for functions, methods and assignments."""
    path = ROOT / "chapters" / "ch01_naive" / "llm.py"
    lines = path.read_text(encoding="utf-8").splitlines()
    start, end = hooks.resolve(path, "naive_generate")
    assert lines[start - 1].startswith("@torch.inference_mode()")
    assert lines[start].startswith("def naive_generate(")
    assert lines[end - 1].strip() == "return output, reason"
    start, end = hooks.resolve(path, "LLM.generate")
    assert lines[start - 1].strip().startswith("def generate(")
    start, end = hooks.resolve(ROOT / "nanovllm" / "config.py", "ARCHITECTURES")
    assert start < end
    with pytest.raises(KeyError):
        hooks.resolve(path, "no_such_function")


def test_named_c_includes_resolve_to_whole_functions():
    """A C function by name: the comment just above it through its closing brace; prototypes and calls are skipped."""
    path = ROOT / "nanovllm" / "kernels" / "paged_attention_cpu.c"
    lines = path.read_text(encoding="utf-8").splitlines()
    start, end = hooks.resolve(path, "paged_decode_attention")
    assert lines[start - 1].startswith("/*") and lines[start].startswith("int paged_decode_attention(")
    assert lines[end - 1] == "}" and hooks.NAMED.match(f"{rel(path)}:paged_decode_attention")
    start, end = hooks.resolve(path, "attend_any")
    assert "attend_any(" in lines[start] and lines[end - 1] == "}" and end - start < 12
    with pytest.raises(KeyError):
        hooks.resolve(path, "no_such_function")


@pytest.mark.parametrize("chapter", sorted(c for c in TASKS if (ROOT / "book" / f"{c}.md").exists()))
def test_book_and_solutions_number_the_tasks_as_tasks_py(chapter):
    page = (ROOT / "book" / f"{chapter}.md").read_text(encoding="utf-8")
    solutions = (ROOT / "solutions" / f"{chapter}.md").read_text(encoding="utf-8")
    for task in TASKS[chapter]:
        assert re.search(rf"^#+ Task {task.number}: `{re.escape(task.name)}`", page, re.M), (chapter, task)
        assert re.search(rf"^## Task {task.number}: {re.escape(task.name)}$", solutions, re.M), (chapter, task)
        assert f"-m {chapter} -k task{task.number}" in page, (chapter, task)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=rel)
def test_notebooks_are_stored_executed(notebook):
    """The book shows a notebook's stored outputs: every code cell must have run, in order, without an error."""
    cells = [c for c in json.loads(notebook.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "code"]
    counts = [c["execution_count"] for c in cells]
    assert counts == list(range(1, len(cells) + 1)), f"re-run it: jupyter nbconvert --execute --inplace {rel(notebook)}"
    errors = [o for c in cells for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, errors[:1]


@pytest.mark.slow
def test_book_builds_strictly_without_warnings(tmp_path):
    for module in ("mkdocs", "material", "mkdocs_jupyter"):
        if importlib.util.find_spec(module) is None:
            if os.environ.get("CI") == "true":
                pytest.fail(f"{module} is not installed, and CI must build the book (pip install -e '.[book]')")
            pytest.skip(f"{module} is not installed: pip install -e '.[book]' to build the book")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's banner about its successor
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    flagged = [line for line in output.splitlines() if re.search(r"\b(WARNING|ERROR)\b", line)]
    assert not flagged, "\n".join(flagged)
    chapters = sorted(p.stem for p in (ROOT / "book").glob("ch*.md"))
    pages = ["index.html"] + [f"{c}/index.html" for c in chapters] + [f"solutions/{c}/index.html" for c in chapters]
    for page in pages + [f"notebooks/{nb.stem}/index.html" for nb in NOTEBOOKS]:
        assert (tmp_path / "site" / page).is_file(), page
