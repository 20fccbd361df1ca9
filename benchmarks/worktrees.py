"""Chapters at other git commits: `chNN@REF` names, commits resolved by git, one cached worktree per commit.

A worktree is made once per commit under `.bench_worktrees/<sha>` in the repository root (git-ignored;
`$NANOVLLM_BENCH_WORKTREES` moves it) and reused by later runs. It holds only what was committed. To free
the space: `rm -rf .bench_worktrees && git worktree prune`.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path

from benchmarks import BenchError
from benchmarks.models import ROOT


def split_ref(name: str) -> tuple[str, str | None]:
    """'ch04@d210eab' -> ('ch04', 'd210eab'); 'ch04' -> ('ch04', None)."""
    engine, at, ref = name.partition("@")
    return engine, (ref.strip() if at else None)


def worktrees_dir() -> Path:
    env = os.environ.get("NANOVLLM_BENCH_WORKTREES")
    return Path(env) if env else ROOT / ".bench_worktrees"


def _git(*args: str, root: Path = ROOT) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise BenchError("chNN@REF engines need git, and it is not installed") from None


def resolve_ref(ref: str) -> str:
    """The full commit id REF names in this repository; a BenchError when it names none."""
    if not ref or ref.startswith("-"):  # never let a ref be read as an option of git's
        raise BenchError(f"{ref!r} is not a git revision")
    found = _git("rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}")
    if found.returncode != 0 or not found.stdout.strip():
        if _git("rev-parse", "--git-dir").returncode != 0:
            raise BenchError(f"@{ref}: {ROOT} is not a git clone, so chNN@REF engines cannot be made")
        raise BenchError(f"@{ref}: no such commit, branch or tag in {ROOT}")
    return found.stdout.strip()


def chapter_at(sha: str, chapter: str) -> str:
    """The chapter's package folder at commit `sha` ('ch04' -> 'ch04_continuous_batching'); BenchError when absent."""
    listing = _git("ls-tree", "-d", "--name-only", sha, "chapters/")
    folders = [Path(p).name for p in listing.stdout.split()]
    for folder in folders:
        if folder[:4] == chapter:
            return folder
    have = ", ".join(f[:4] for f in folders if f[:2] == "ch" and f[2:4].isdigit()) or "none"
    raise BenchError(f"commit {sha[:10]} has no chapter {chapter} (it has: {have})")


def worktree(sha: str) -> Path:
    """A checkout of commit `sha`, made on first use (`git worktree add --detach`) and reused after that."""
    folder = worktrees_dir() / sha
    if _is_checkout(folder, sha):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # two benchmark runs may want the same commit at once: one makes it, the other waits and reuses it
    with open(folder.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _is_checkout(folder, sha):
            # --force: the folder may still be registered from a checkout someone deleted by hand
            made = _git("worktree", "add", "--force", "--detach", str(folder), sha)
            if made.returncode != 0 or not _is_checkout(folder, sha):
                message = " ".join(made.stderr.split()) or "no message"
                raise BenchError(f"could not make a worktree of {sha[:10]} in {folder}: {message}")
    return folder


def _is_checkout(folder: Path, sha: str) -> bool:
    if not (folder / ".git").exists():
        return False
    head = _git("rev-parse", "HEAD", root=folder)
    return head.returncode == 0 and head.stdout.strip() == sha
