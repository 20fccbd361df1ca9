"""Shared fixtures: the tiny oracle models, stories260K, and --impl (reference code or the learner's exercises)."""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TINY_MODELS = ROOT / "tests" / "models"
SHARED = ROOT.parent / "shared"
PACKAGES = ("nanovllm", "chapters")
FAMILIES = [
    "tiny-llama",
    "tiny-llama3",
    "tiny-mistral",
    "tiny-qwen2",
    "tiny-qwen3",
    "tiny-mixtral",
    "tiny-qwen3-moe",
    "tiny-gemma",
    "tiny-gemma2",
    "tiny-mistral-window",
    "tiny-gpt2",
    "tiny-phi3",
    "tiny-qwen2-moe",
]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--impl",
        choices=["reference", "exercises"],
        default="reference",
        help="run the exercise tests against the reference code (default) or your files in exercises/",
    )


def pytest_configure(config: pytest.Config) -> None:
    for n in range(1, 10):
        config.addinivalue_line("markers", f"task{n}: exercise task {n} of its chapter (-m 'ch02 and task{n}')")
    if config.getoption("--impl") == "exercises":
        config.pluginmanager.register(ExerciseFeedback(), "exercise-feedback")
        if config.option.tbstyle == "auto":  # a learner's failure: the line and the error, not the stub's docstring
            config.option.tbstyle = "short"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        # Any test that asks for `impl` is an exercise test: CI proves each one fails on the untouched stubs.
        if "impl" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.exercise)
        # test_taskN_... (and test_tasksNtoM_...) carry the marker taskN, so -m "ch01 and task2" selects a task
        for n in task_numbers(item.name):
            item.add_marker(getattr(pytest.mark, f"task{n}"))


def task_numbers(test_name: str) -> range:
    """The tasks a test checks, from its name: test_task2_... is task 2, test_tasks3to5_... tasks 3 to 5."""
    match = re.match(r"test_tasks?(\d+)(?:to(\d+))?_", test_name)
    return range(int(match[1]), int(match[2] or match[1]) + 1) if match else range(0)


class ExerciseFeedback:
    """Under --impl=exercises: run only the exercise tests, and end with one line per task (done, not yet, failing),
    with a hint from the worked solutions for a failing one (HINTS in exercises/tasks.py)."""

    def __init__(self) -> None:
        self.deselected = 0
        self.tasks: dict[str, tuple[str, range]] = {}  # test id -> (chapter, its tasks; empty: several together)
        self.outcomes: dict[str, set[str]] = {}  # test id -> the outcomes of its phases (setup, call, teardown)
        self.errors: dict[str, list[str]] = {}  # test id -> the error of each failed phase

    # trylast: after -m and -k have chosen, so the note counts only what this command would have run
    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        reference_only = [item for item in items if not item.get_closest_marker("exercise")]
        if reference_only:
            config.hook.pytest_deselected(items=reference_only)
            items[:] = [item for item in items if item.get_closest_marker("exercise")]
        self.deselected = len(reference_only)
        for item in items:
            name = getattr(item, "originalname", None) or item.name  # without the [parameters]
            self.tasks[item.nodeid] = (item.module.CHAPTER, task_numbers(name))

    def pytest_report_collectionfinish(self) -> str | None:
        if not self.deselected:
            return None
        return (
            f"--impl=exercises: running the exercise tests only; {self.deselected} test{'s' * (self.deselected > 1)} "
            "of the reference code alone deselected (run those without --impl)"
        )

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.nodeid in self.tasks:
            self.outcomes.setdefault(report.nodeid, set()).add(report.outcome)
            if report.failed:
                crash = getattr(report.longrepr, "reprcrash", None)  # the error line, whatever --tb says
                self.errors.setdefault(report.nodeid, []).append(crash.message if crash else str(report.longrepr))

    def pytest_terminal_summary(self, terminalreporter) -> None:
        from exercises.tasks import TASKS

        groups: dict[tuple[str, int], list[str]] = {}  # (chapter, task number; 0: several together) -> test ids
        for nodeid, (chapter, numbers) in self.tasks.items():
            if nodeid in self.outcomes:  # it ran (-x or Ctrl-C may end a run early)
                for n in numbers or [0]:
                    groups.setdefault((chapter, n), []).append(nodeid)
        if groups:
            terminalreporter.section("exercise tasks", sep="-")
        for (chapter, n), nodeids in sorted(groups.items(), key=lambda group: (group[0][0], group[0][1] or 99)):
            task = next((t for t in TASKS[chapter] if t.number == n), None)
            status, hint = self.status(nodeids, task)
            label = f"{chapter} task {n} {task.name}" if task else f"{chapter} tasks together"
            terminalreporter.write_line(f"{label}: {status}")
            if hint:
                terminalreporter.write_line(f"    hint: {hint}")

    def status(self, nodeids: list[str], task) -> tuple[str, str]:
        """done, not yet (a stub still raises NotImplementedError), failing (with a hint) or skipped."""
        failed = [i for i in nodeids if i in self.errors]
        if not failed:
            return ("skipped" if all(self.outcomes[i] == {"skipped"} for i in nodeids) else "done"), ""
        errors = [e for i in failed for e in self.errors[i]]
        if all("NotImplementedError" in e for e in errors):
            # the stub of this task, or of a task it calls (ch01 task 6 samples with task 5's sample_token)
            stubs = {m[0] for e in errors for m in re.finditer(r"ch\d\d task \d+", e)}
            if not stubs or (task is not None and f"{task.chapter} task {task.number}" in stubs):
                return "not yet (NotImplementedError)", ""
            return f"not yet (waits for {', '.join(sorted(stubs))})", ""
        count = f"failing ({len(failed)} of {len(nodeids)} tests)"
        if task is None:
            return count, "these run the engine on all your functions: make each task pass first (-k taskN)"
        solution = f"solutions/{task.chapter}.md"
        return count, task.hint + (f" (more: {solution}, Task {task.number})" if (ROOT / solution).exists() else "")


def shared_path(relative: str) -> Path:
    """A path under ../shared; skipped in a learner's clone without it, a failure under CI."""
    path = SHARED / relative
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing, and CI must have ../shared")
        pytest.skip(
            f"{path} is absent (a clone without ../shared): this test needs the shared stories260K model "
            "(README.md, Contributing, says how to get it)"
        )
    return path


def require(why: str | None, what: str, hint: str = "") -> None:
    """Skip the test when `what` (a kernel, a backend) cannot run here and `why` says why; under CI, fail instead."""
    if why is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run {what}: {why}")
    pytest.skip(f"{what} cannot run here: {why}{hint}")


@pytest.fixture
def threads(request: pytest.FixtureRequest):
    """Run the test body with torch (and so the C kernels) set to this many threads (parametrize it indirectly)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def stories260k() -> Path:
    return shared_path("models/stories260K")


@pytest.fixture(scope="session")
def oracle() -> dict:
    """Greedy tokens and last-position logits that transformers produced for each tiny model."""
    return json.loads((TINY_MODELS / "oracle.json").read_text())


@pytest.fixture(scope="session")
def impl_name(request: pytest.FixtureRequest) -> str:
    return request.config.getoption("--impl")


@pytest.fixture
def impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """The task functions of this test's chapter, from the reference or from exercises/chNN/.

    Under --impl=exercises, the learner's functions are also patched into the reference modules,
    so whole-model tests (greedy tokens equal transformers') run on the learner's code.
    """
    from exercises.tasks import TASKS

    chapter = request.module.CHAPTER
    use_exercises = request.config.getoption("--impl") == "exercises"
    funcs = {}
    for task in TASKS[chapter]:
        name = task.name.split(".")[0]  # a method task ("BlockManager.allocate") swaps in the learner's class
        reference = getattr(importlib.import_module(task.module), name)
        if use_exercises:
            mine = getattr(importlib.import_module(task.exercise_module), name)
            # patch every module that imported the reference by name, not only its home
            for module in list(sys.modules.values()):
                if getattr(module, "__name__", "").startswith(PACKAGES) and getattr(module, name, None) is reference:
                    monkeypatch.setattr(module, name, mine)
            funcs[name] = mine
        else:
            funcs[name] = reference
    return type("Impl", (), {k: v if isinstance(v, type) else staticmethod(v) for k, v in funcs.items()})
