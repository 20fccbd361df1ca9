"""MkDocs hooks of the book: pull in pages that live outside book/, and include code by name, not line number.

1. The notebooks (notebooks/*.ipynb) and the worked solutions (solutions/*.md) each have one home in the
   repository; `on_files` adds them to the site under those same paths, so nothing is copied or symlinked.
2. `--8<-- "nanovllm/layers/norm.py:rms_norm"` includes the function `rms_norm` of that file (decorators
   through its last line); `File.py:Class.method` a method. pymdownx.snippets only knows line ranges and
   marker comments; `on_page_markdown` rewrites each such name into the line range it has in the source
   today, so the book follows the code when lines move, and the build fails if a name disappears.
   `File.c:function` includes a C function: the comment just above it, its signature and its body.
3. A notebook page would show each cell's tags above it; `nbval-ignore-output` is there for CI's nbval run, not
   for the reader, and `on_page_content` removes it (`strip_nbval_tags`).

tests/test_book.py imports `snippet_includes` and `resolve` from here to check every include.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

try:
    from mkdocs.plugins import event_priority
except ImportError:  # tests/test_book.py checks the includes with this file where mkdocs is not installed

    def event_priority(priority):
        return lambda method: method


ROOT = Path(__file__).resolve().parent.parent
OUTSIDE_PAGES = ("notebooks/*.ipynb", "solutions/*.md")  # repository paths; their site paths are the same
# One tag of mkdocs-jupyter's cell toolbar (its notebook.html.j2 template), when it is an nbval-* tag; and a toolbar
# left with no tag at all.
NBVAL_TAG = re.compile(
    r'<div class="button_container tags_button_container">\s*<span class="tag-container">\s*'
    r'<span class="cell-tag">nbval-[\w-]*</span>\s*</span>\s*</div>\s*'
)
EMPTY_TOOLBAR = re.compile(r'<div class="celltoolbar">\s*</div>\s*')

# One snippet include per line: `--8<-- "path"`, where path may end in :name, :Class.method or :start:end.
SNIPPET = re.compile(
    r"""^(?P<indent>[ \t]*)(?P<scissors>-+8<-+[ \t]+)(?P<quote>["'])(?P<target>[^"']+)(?P=quote)\s*$"""
)
NAMED = re.compile(r"^(?P<path>.+\.(?:py|c)):(?P<name>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)$")


def snippet_includes(markdown: str) -> list[tuple[int, str]]:
    """(line number, target) of each snippet include in a Markdown text."""
    return [(i, m["target"]) for i, line in enumerate(markdown.splitlines(), 1) if (m := SNIPPET.match(line))]


def resolve(path: Path, name: str) -> tuple[int, int]:
    """The 1-based, inclusive line range of a top-level function, class or assignment (or Class.method).

    In a .c file, of a function: see resolve_c.
    """
    if path.suffix == ".c":
        return resolve_c(path, name)
    body = ast.parse(path.read_text(encoding="utf-8"), filename=str(path)).body
    node = None
    for part in name.split("."):
        node = next((n for n in body if _defines(n, part)), None)
        if node is None:
            raise KeyError(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: no top-level {name!r}")
        body = getattr(node, "body", [])
    first = min([d.lineno for d in getattr(node, "decorator_list", [])] + [node.lineno])
    return first, node.end_lineno


def resolve_c(path: Path, name: str) -> tuple[int, int]:
    """The line range of the C function `name`: the comment that ends just above it, its signature, its body.

    A definition starts at column 0 (bodies are indented) and is not a prototype; where preprocessor branches
    define the function more than once (one per instruction set), the first one is taken.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    code = _c_code(lines)
    head = re.compile(rf"^[A-Za-z_][^;]*\b{re.escape(name)}\s*\(")
    for first, line in enumerate(code):
        if not head.match(line):
            continue
        depth = 0
        for last in range(first, len(code)):
            if depth == 0 and "{" not in code[last] and code[last].rstrip().endswith(";"):
                break  # a prototype, not a definition
            depth += code[last].count("{") - code[last].count("}")
            if depth == 0 and "}" in code[last]:
                start = first
                if start and lines[start - 1].rstrip().endswith("*/"):  # the comment that says what it does
                    while not lines[start - 1].lstrip().startswith("/*"):
                        start -= 1
                    start -= 1
                return start + 1, last + 1
    raise KeyError(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: no C function {name!r}")


def _c_code(lines: list[str]) -> list[str]:
    """The lines of a C file with comments and character or string literals blanked: braces left are code."""
    out, in_comment = [], False
    for line in lines:
        kept, i = [], 0
        while i < len(line):
            if in_comment:
                end = line.find("*/", i)
                i, in_comment = (len(line), True) if end < 0 else (end + 2, False)
            elif line.startswith("/*", i):
                in_comment, i = True, i + 2
            elif line.startswith("//", i):
                break
            elif line[i] in "'\"":
                m = re.match(r"'(?:\\.|[^'\\])*'|\"(?:\\.|[^\"\\])*\"", line[i:])
                kept.append(" ")
                i += len(m.group()) if m else 1
            else:
                kept.append(line[i])
                i += 1
        out.append("".join(kept))
    return out


def _defines(node: ast.stmt, name: str) -> bool:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name == name
    if isinstance(node, ast.Assign):
        return any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
    if isinstance(node, ast.AnnAssign):
        return isinstance(node.target, ast.Name) and node.target.id == name
    return False


def named_to_lines(target: str) -> str:
    """'file.py:name' -> 'file.py:start:end'; any other target is returned unchanged."""
    m = NAMED.match(target)
    if not m:
        return target
    start, end = resolve(ROOT / m["path"], m["name"])
    return f"{m['path']}:{start}:{end}"


@event_priority(100)  # before mkdocs-jupyter's on_files, which turns .ipynb files into pages
def on_files(files, config):
    from mkdocs.structure.files import File

    for pattern in OUTSIDE_PAGES:
        for path in sorted(ROOT.glob(pattern)):
            uri = path.relative_to(ROOT).as_posix()
            if files.get_file_from_path(uri) is None:
                files.append(File(uri, str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files


def on_page_markdown(markdown, page, config, files):
    from mkdocs.exceptions import PluginError

    lines = markdown.split("\n")
    for i, line in enumerate(lines):
        m = SNIPPET.match(line)
        if m:
            try:
                target = named_to_lines(m["target"])
            except (KeyError, OSError, SyntaxError) as e:
                raise PluginError(f"{page.file.src_uri}: snippet {m['target']!r}: {e}") from e
            lines[i] = f"{m['indent']}{m['scissors']}{m['quote']}{target}{m['quote']}"
    return "\n".join(lines)


def strip_nbval_tags(html: str) -> str:
    """A notebook page's HTML without its nbval-* cell tags (other tags stay), nor the toolbars they leave empty."""
    return EMPTY_TOOLBAR.sub("", NBVAL_TAG.sub("", html))


def on_page_content(html, page, config, files):
    # mkdocs-jupyter has rendered a notebook page's HTML by now (in on_pre_page); other pages have no cell tags
    return strip_nbval_tags(html) if page.file.src_uri.endswith(".ipynb") else html
