"""Shared fixtures: the tiny oracle models, stories260K, and --impl (reference code or the learner's exercises)."""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY_MODELS = ROOT / "tests" / "models"
SHARED = ROOT.parent / "shared"
PACKAGES = ("nanovllm", "chapters")
FAMILIES = ["tiny-llama", "tiny-llama3", "tiny-mistral", "tiny-qwen2", "tiny-qwen3"]


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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        # Any test that asks for `impl` is an exercise test: CI proves each one fails on the untouched stubs.
        if "impl" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.exercise)
        # test_taskN_... (and test_tasksNtoM_...) carry the marker taskN, so -m "ch01 and task2" selects a task
        if match := re.match(r"test_tasks?(\d+)(?:to(\d+))?_", item.name):
            first, last = int(match[1]), int(match[2] or match[1])
            for n in range(first, last + 1):
                item.add_marker(getattr(pytest.mark, f"task{n}"))


def shared_path(relative: str) -> Path:
    """A path under ../shared; skipped in a learner's clone without it, a failure under CI."""
    path = SHARED / relative
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing, and CI must have ../shared")
        pytest.skip(f"{path} is absent (a clone without ../shared): this test needs the shared stories260K model")
    return path


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
