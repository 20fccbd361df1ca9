"""A chapter at another git commit (`ch04@d210eab`), run in a worker process on that commit's own code.

The benchmark (this tree) starts `python benchmarks/worker_boot.py` with the worktree of the commit as its working
folder and first on PYTHONPATH, so `nanovllm` and `chapters` are that commit's; torch and the rest are the same
venv's. The measuring code is this tree's: the worker loads this tree's `benchmarks` package from its folder, by
path, under its own name `benchmarks`, before anything can import the worktree's copy of it. One package named
`benchmarks` per process, so the results it sends back (RunResult, pickled) are the classes the benchmark knows,
and the worker runs the very ChapterEngine the benchmark runs in process: same streaming, TTFT/TPOT, forward-pass
count. The worker's torch threads are the benchmark's.

Messages are pickles: the benchmark writes (command, argument) to the worker's stdin; the worker answers
("ok", value), ("error", text) or, during a run, ("progress", text), on a copy of its stdout; its own stdout
goes to stderr, so nothing the chapter prints can garble an answer. The worker measures its own memory (loading
and each run) and exits when its stdin closes.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
import traceback
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO

import torch

from benchmarks import BenchError
from benchmarks.engines import Engine, RunResult
from benchmarks.models import ResolvedModel
from benchmarks.workloads import Request
from benchmarks.worktrees import chapter_at, resolve_ref, split_ref, worktree

HERE = Path(__file__).resolve().parent  # this tree's benchmarks package
PROGRESS_EVERY_S = 1.0  # how often a worker tells how far a run has got


class WorkerEngine(Engine):
    """The benchmark's side: a chapter at commit REF, in a worker process, answering as a ChapterEngine would."""

    kind = "chapter"

    def __init__(
        self,
        name: str,
        model: ResolvedModel,
        device: str,
        dtype: str,
        options: dict[str, Any],
        shared: dict[str, Any] | None = None,
    ):
        self.name = name
        chapter, ref = split_ref(name)
        self.sha = resolve_ref(ref)
        folder = chapter_at(self.sha, chapter)
        self.worktree = worktree(self.sha)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.worktree), env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "worker_boot.py")],
            cwd=self.worktree,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        # a worker left behind (an error between load and close) ends with its pipe
        self._finalizer = weakref.finalize(self, _stop, self.proc)
        self._progress: str | None = None
        # a relative model path means the benchmark's working folder, not the worktree
        model = replace(model, path=model.path.resolve(), hf_path=model.hf_path.resolve())
        settings = {
            "chapter": chapter,
            "package": f"chapters.{folder}",
            "model": model,
            "device": device,
            "dtype": dtype,
            "options": options,
            "shared": shared,
            "threads": torch.get_num_threads(),
        }
        try:
            hello = self._call("init", settings)
        except BaseException:
            self._finalizer()  # the worker goes now, not whenever this half-made engine is collected
            raise
        self.streams, self._info = hello["streams"], hello["info"]
        self._info.update(ref=ref, commit=self.sha, worktree=str(self.worktree), process="worker")
        self._first_run = True

    def _call(self, command: str, argument: Any = None) -> Any:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name}: its worker process has exited (code {self.proc.returncode})")
        try:
            pickle.dump((command, argument), self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self.proc.stdin.flush()
            while True:
                kind, value = pickle.load(self.proc.stdout)
                if kind == "progress":
                    self._progress = value
                    continue
                break
        except (EOFError, BrokenPipeError) as e:
            code = self.proc.wait()
            raise RuntimeError(f"{self.name}: its worker process died (code {code}; its error is above)") from e
        if kind == "error":
            if command == "init":  # a chapter that cannot load with these options: the user's to fix
                raise BenchError(f"{self.name}: {value}")
            raise RuntimeError(f"{self.name} (in its worker process): {value}")
        return value

    def run(self, requests: list[Request]) -> RunResult:
        self._progress = None
        result, load_mem = self._call("run", requests)
        if self._first_run:  # the runner measures loading as the load plus one tiny run: so does the worker
            self.load_mem_bytes, self._first_run = load_mem, False
        return result

    def progress(self) -> str | None:
        return self._progress

    def kv_cache_bytes(self, requests: list[Request]) -> int | None:
        return self._call("kv_cache_bytes", requests)

    def info(self) -> dict[str, Any]:
        return dict(self._info)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self._call("close")
            except RuntimeError:
                pass
        self._finalizer()


def _stop(proc: subprocess.Popen) -> None:
    for pipe in (proc.stdin, proc.stdout):
        try:
            pipe.close()
        except OSError:
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Worker:
    """The worker's side: one chapter engine, built and run on request."""

    def __init__(self, answers: BinaryIO):
        self.answers = answers
        self.lock = threading.Lock()  # the progress thread and the main thread write answers
        self.engine: Any = None
        self.device = "cpu"
        self.load_mem: Any = None  # PeakMemory from loading to the end of the first run

    def send(self, kind: str, value: Any) -> None:
        with self.lock:
            pickle.dump((kind, value), self.answers, protocol=pickle.HIGHEST_PROTOCOL)
            self.answers.flush()

    def init(self, a: dict[str, Any]) -> dict[str, Any]:
        import importlib

        from benchmarks.engines import create_engine
        from benchmarks.measure import PeakMemory

        torch.set_num_threads(a["threads"])
        self.device = a["device"]
        module = importlib.import_module(a["package"])  # imported before measuring, as the benchmark's preload
        here = Path.cwd().resolve()
        for name in ("nanovllm", "chapters"):
            where = Path(importlib.import_module(name).__file__).resolve()
            if here not in where.parents:  # never measure the benchmark's own tree by mistake
                raise RuntimeError(f"{name} was imported from {where}, not from the worktree {here}")
        self.load_mem = PeakMemory(a["device"]).__enter__()
        self.engine = create_engine(a["chapter"], a["model"], a["device"], a["dtype"], a["options"], a["shared"])
        info = {**self.engine.info(), "source": str(Path(module.__file__).resolve().parent)}
        return {"streams": self.engine.streams, "info": info}

    def run(self, requests: list[Request]) -> tuple[RunResult, int | None]:
        from benchmarks.measure import PeakMemory

        done = threading.Event()
        ticker = threading.Thread(target=self._tell_progress, args=(done,), daemon=True)
        ticker.start()
        try:
            with PeakMemory(self.device) as mem:
                result = self.engine.run(requests)
        finally:
            done.set()
            ticker.join()
        result.peak_mem_bytes = mem.cuda_peak if mem.cuda_peak is not None else mem.peak
        result.mem_growth_bytes = mem.growth
        load = None
        if self.load_mem is not None:
            self.load_mem.__exit__(None, None, None)
            load, self.load_mem = self.load_mem.growth, None
        return result, load

    def _tell_progress(self, done: threading.Event) -> None:
        told = None
        while not done.wait(PROGRESS_EVERY_S):
            now = self.engine.progress()
            if now != told:
                self.send("progress", now)
                told = now

    def kv_cache_bytes(self, requests: list[Request]) -> int | None:
        return self.engine.kv_cache_bytes(requests)

    def serve(self, commands: BinaryIO) -> int:
        while True:
            try:
                command, argument = pickle.load(commands)
            except EOFError:  # the benchmark has gone
                return 0
            try:
                if command == "close":
                    if self.engine is not None:
                        self.engine.close()
                    self.send("ok", None)
                    return 0
                if command not in ("init", "run", "kv_cache_bytes"):
                    raise ValueError(f"unknown command {command!r}")
                self.send("ok", getattr(self, command)(argument))
            except Exception as e:  # told to the benchmark in one line; the whole story on stderr
                traceback.print_exc()
                self.send("error", f"{type(e).__name__}: {' '.join(str(e).split())}")


def serve() -> int:
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever the chapter prints goes to stderr, never into an answer
    return Worker(answers).serve(sys.stdin.buffer)
