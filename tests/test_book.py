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
    # no nbval tag above a notebook's cells (book/hooks.py), and every page gets book/code-scroll.css
    for notebook in NOTEBOOKS:
        html = (tmp_path / "site" / "notebooks" / notebook.stem / "index.html").read_text(encoding="utf-8")
        assert 'class="cell-tag">nbval-' not in html, notebook.name
    assert 'href="code-scroll.css"' in (tmp_path / "site" / "index.html").read_text(encoding="utf-8")


CHAPTER_PACKAGES = sorted(p.name for p in (ROOT / "chapters").glob("ch[0-9][0-9]_*") if (p / "__init__.py").is_file())
TO_COME = re.compile(r"\bto come\b(?! back)", re.I)  # "the page to come back to" is not a promise


@pytest.mark.parametrize("page", ["README.md", "book/index.md", "book/how-to-use.md"])
def test_no_page_says_a_chapter_is_to_come(page):
    text = (ROOT / page).read_text(encoding="utf-8")
    assert not TO_COME.search(text), f"{page}: {TO_COME.search(text).group()!r}: say what exists"


@pytest.mark.parametrize("page", ["README.md", "book/index.md"])
def test_every_chapter_package_has_a_row_in_the_course_table(page):
    rows = [line for line in (ROOT / page).read_text(encoding="utf-8").splitlines() if line.startswith("| ")]
    assert len(CHAPTER_PACKAGES) >= 7
    for package in CHAPTER_PACKAGES:
        row = next((r for r in rows if f"`chapters.{package}`" in r), None)
        assert row, f"{page}: the course table has no row for chapters.{package}"
        assert row.split("|")[1].strip() == str(int(package[2:4])), row


def test_readme_says_how_to_get_stories260k():
    """The tests that skip without ../shared/models/stories260K: the README says where it comes from and which files
    go there (every file a test reads from it)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "../shared/models/stories260K" in readme
    assert "https://huggingface.co/karpathy/tinyllamas/resolve/main/stories260K/" in readme
    others = [path for path in (ROOT / "tests").glob("test_*.py") if path.name != "test_book.py"]  # not this regex
    tests = "".join(path.read_text(encoding="utf-8") for path in others)
    read = set(re.findall(r'stories260k / "([^"]+)"', tests)) | {"stories260K.bin", "tok512.bin"}
    assert read <= set(re.findall(r"[\w.]+\.(?:bin|model|md)\b", readme)), read


def test_notebook_pages_hide_the_nbval_tags_and_keep_others():
    def toolbar(*tags: str) -> str:  # the HTML mkdocs-jupyter writes above a tagged cell
        return (
            '<div class="celltoolbar">\n'
            + "".join(
                '<div class="button_container tags_button_container">\n<span class="tag-container">\n'
                f'<span class="cell-tag">{tag}</span>\n</span>\n</div>\n'
                for tag in tags
            )
            + "</div>\n"
        )

    code = '<div class="CodeMirror cm-s-jupyter">x = 1</div>'
    assert hooks.strip_nbval_tags(toolbar("nbval-ignore-output") + code) == code
    kept = hooks.strip_nbval_tags(toolbar("nbval-ignore-output", "slow") + code)
    assert 'class="cell-tag">slow<' in kept and "nbval" not in kept


def test_wide_code_listings_scroll_visibly_and_the_readme_build_silences_the_banner():
    extra_css = re.search(r"^extra_css:\n((?:  - .*\n)+)", (ROOT / "mkdocs.yml").read_text(encoding="utf-8"), re.M)
    assert extra_css, "mkdocs.yml: no extra_css"
    sheets = [line.split("#")[0].strip()[2:] for line in extra_css[1].splitlines()]
    css = "".join((ROOT / "book" / sheet).read_text(encoding="utf-8") for sheet in sheets)
    assert ".md-typeset pre > code" in css and "overflow-x: auto" in css
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "NO_MKDOCS_2_WARNING=1 mkdocs build --strict" in readme
    assert "export NO_MKDOCS_2_WARNING=1" in (ROOT / "tools" / "test_all.sh").read_text(encoding="utf-8")


CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def test_readme_and_the_course_guide_give_the_same_install_advice():
    """Both tell a Linux CPU user to take torch, at the version the README's test command pins, from PyTorch's CPU
    index, and both say what each extra of pyproject.toml brings. The test command itself stays as CI runs it."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    guide = (ROOT / "book" / "how-to-use.md").read_text(encoding="utf-8")
    command = re.search(r"<!-- test-command -->\n```bash\n(.+)\n```\n<!-- /test-command -->", readme)[1]
    assert "--index-url" not in command  # CI's machine reaches PyPI only
    pin = re.search(r"pip install (torch==[\w.]+)", command)[1]
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")  # (tomllib needs Python 3.11)
    section = re.search(r"^\[project\.optional-dependencies\]\n(.*?)^\[", pyproject, re.M | re.S)[1]
    extras = re.findall(r"^([\w-]+) = \[", section, re.M)
    assert len(extras) >= 6, extras
    for name, text in (("README.md", readme), ("book/how-to-use.md", guide)):
        torches = re.findall(r"pip install (torch[^\s`]*)(?: --index-url ([^\s`]+))?", text)
        assert torches and {t for t, _ in torches} == {pin}, f"{name}: every torch install pins {pin}: {torches}"
        assert (pin, CPU_INDEX) in torches, f"{name}: no `pip install {pin} --index-url {CPU_INDEX}`"
        assert "Linux without an NVIDIA GPU" in text, name
        missing = [extra for extra in extras if f"`.[{extra}]`" not in text]
        assert not missing, f"{name}: says nothing of the extras {missing}"
