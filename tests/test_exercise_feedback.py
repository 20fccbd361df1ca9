"""What a learner sees from `pytest --impl=exercises`: only the exercise tests run, and the run ends with one line per
task (done, not yet, failing), a failing task with a hint from its worked solution."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, ExerciseFeedback
from exercises.tasks import HINTS, TASKS

# stands in for a learner's answers, in memory, without touching exercises/: task 1 with the pitfall `sum` for `mean`
# (its scale-invariance test still passes, its comparison with transformers does not), task 3 the reference itself;
# task 2 stays the untouched stub
ANSWERS = """
import torch

import exercises.ch01.activation
import exercises.ch01.norm
from nanovllm.layers.activation import silu_and_mul


def rms_norm(x, weight, eps):
    return (x.float() * torch.rsqrt(x.float().pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype) * weight


exercises.ch01.norm.rms_norm = rms_norm
exercises.ch01.activation.silu_and_mul = silu_and_mul
"""


@pytest.fixture(scope="module")
def learner_run(tmp_path_factory) -> str:
    """One run of `pytest --impl=exercises -m ch01 -k ...` (a subprocess: the summary is the end of a session)."""
    plugin = tmp_path_factory.mktemp("learner")
    (plugin / "learner_answers.py").write_text(ANSWERS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin), os.environ.get("PYTHONPATH", "")])}
    # test_api.py's test is a ch01 test of the reference code alone: -k selects it, --impl=exercises must not run it
    keywords = "task1 or task2 or task3 or test_min_tokens_above_max_tokens"
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "learner_answers", "--impl=exercises"]
    cmd += ["-m", "ch01", "-k", keywords, "tests/test_ch01.py", "tests/test_api.py"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]  # some tests fail
    return run.stdout


@pytest.mark.slow
def test_a_stub_is_not_yet_and_reference_only_tests_do_not_run(learner_run):
    out = learner_run
    assert "test_api.py" not in out, out
    assert "running the exercise tests only; 1 test of the reference code alone deselected" in out, out
    assert re.search(r"^ch01 task 2 apply_rotary: not yet \(NotImplementedError\)$", out, re.M), out
    # short: no stub's docstring, no tensor's repr (--tb=short under --impl=exercises)
    assert "Rotate q or k by its position" not in out and "tensor([" not in out, out
    summary = out[out.index("exercise tasks") : out.index("short test summary")].splitlines()[1:]
    assert [line.split(":")[0] for line in summary if line.startswith("ch01")] == [
        "ch01 task 1 rms_norm",
        "ch01 task 2 apply_rotary",
        "ch01 task 3 silu_and_mul",
    ], summary
    assert out.splitlines()[-1].startswith("==") and "3 failed, 2 passed" in out.splitlines()[-1], out


@pytest.mark.slow
def test_a_wrong_answer_gets_the_pitfall_hint_and_a_right_one_is_done(learner_run):
    out = learner_run
    assert re.search(r"^ch01 task 1 rms_norm: failing \(1 of 2 tests\)$", out, re.M), out
    assert f"    hint: {HINTS['ch01', 1]} (more: solutions/ch01.md, Task 1)" in out, out
    assert re.search(r"^ch01 task 3 silu_and_mul: done$", out, re.M), out
    assert out.count("hint:") == 1  # a stub is not a mistake: no hint for task 2


def test_a_task_blocked_by_another_tasks_stub_says_which():
    feedback = ExerciseFeedback()
    feedback.outcomes = {"a": {"passed", "failed"}, "b": {"skipped"}}
    feedback.errors = {"a": ["NotImplementedError: ch01 task 5: greedy or temperature sampling"]}
    task6 = TASKS["ch01"][5]
    assert feedback.status(["a"], task6) == ("not yet (waits for ch01 task 5)", "")
    assert feedback.status(["b"], task6) == ("skipped", "")
    feedback.errors["a"] = ["AssertionError: Tensor-likes are not close!"]
    status, hint = feedback.status(["a", "b"], task6)
    assert status == "failing (1 of 2 tests)" and hint.startswith(HINTS["ch01", 6])


def test_every_task_with_a_worked_solution_has_a_hint():
    """The hints are the solutions' pitfalls in one line: a chapter's solutions/chNN.md brings its hints."""
    for chapter, tasks in TASKS.items():
        if (ROOT / "solutions" / f"{chapter}.md").exists():
            missing = [t.number for t in tasks if (chapter, t.number) not in HINTS]
            assert not missing, f"add HINTS for {chapter} tasks {missing} to exercises/tasks.py"
    assert set(HINTS) <= {(t.chapter, t.number) for tasks in TASKS.values() for t in tasks}
