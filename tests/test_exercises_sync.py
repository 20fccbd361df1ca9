"""The exercise stubs keep the reference's signatures and docstrings, and name their task in their error."""

from __future__ import annotations

import importlib
import inspect

import pytest

from exercises.tasks import TASKS

ALL = [task for tasks in TASKS.values() for task in tasks]


@pytest.mark.parametrize("task", ALL, ids=lambda t: f"{t.chapter}-task{t.number}-{t.name}")
def test_stub_matches_reference_signature_and_docstring(task):
    reference, stub = importlib.import_module(task.module), importlib.import_module(task.exercise_module)
    for part in task.name.split("."):  # "BlockManager.allocate" is a method
        reference, stub = getattr(reference, part), getattr(stub, part)
    assert stub is not reference, "the stub must define its own version"
    assert str(inspect.signature(stub)) == str(inspect.signature(reference))
    assert inspect.getdoc(stub) == inspect.getdoc(reference)


def test_task_numbers_are_consecutive_per_chapter():
    for chapter, tasks in TASKS.items():
        assert [t.number for t in tasks] == list(range(1, len(tasks) + 1)), chapter
