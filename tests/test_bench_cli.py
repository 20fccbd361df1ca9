"""The benchmark as a user's command: one-line errors, exit codes, --list, the thread default, `nanovllm bench`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import cli, models, runner
from benchmarks.engines import EngineUnavailable

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "models" / "tiny-llama"
QUICK = ["--no-bandwidth", "--no-plots", "--threads", "1", "--repeats", "1", "--warmup", "0"]


@pytest.fixture
def no_shared(monkeypatch, tmp_path):
    """A clone without ../shared."""
    monkeypatch.setattr(models, "STORIES260K", tmp_path / "absent" / "stories260K")


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--model", "no-such-model"], "model 'no-such-model' is neither a named model"),
        (["--model", str(TINY), "--workload", "decode-2"], "unknown workload 'decode-2'"),
        (["--model", str(TINY), "--engines", "ch01,ch09"], "unknown engine 'ch09'; engines here: ch01"),
        (["--model", str(TINY), "--engines", "ch04@no-such-ref-x"], "@no-such-ref-x: no such commit"),
        (["--model", "stories260k"], "model stories260k needs the shared folder beside this clone"),
        (["--model", str(TINY), "--engine-opt", "ch01=3"], "is not ENGINE:KEY=VALUE"),
        (
            ["--model", str(TINY), "--engines", "ch01", "--sweep", "ch04:max_num_seqs=2,4"],
            "ch04 is not among --engines",
        ),
        (["--model", str(TINY), "--engines", "ch04", "--sweep", "ch04:max_num_seqs="], "gives no values"),
        (["--model", str(TINY), "--engines", "ch01", "--baseline", "ch02"], "--baseline ch02 is none of the engines"),
        (["--model", str(TINY), "--workload-opt", "num_requests=0"], "num_requests must be an integer >= 1, got 0"),
        (["--model", str(TINY), "--workload-opt", "prompt_len=(64,16)"], "prompt_len must be N or (LOW, HIGH)"),
        (["--model", str(TINY), "--kv-cache-memory", "-5"], "--kv-cache-memory must be a number of bytes >= 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(argv, says, capsys, no_shared, tmp_path):
    assert cli.main([*argv, *QUICK, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("python -m benchmarks: error: ") and says in err, err
    assert not list(tmp_path.iterdir()), "nothing written"


@pytest.mark.parametrize(
    "engine, says",
    [
        ("ch07[bogus=1]", "engine 'ch07': chapters.ch07_quantization.LLM takes no option 'bogus'"),
        ("ch01[max_num_seqs=4]", "takes no option 'max_num_seqs' (it takes: dtype, device, max_model_len, seed)"),
        ("ch07[max_num_seqs=x]", "engine 'ch07': max_num_seqs must be an integer"),  # the engine's own words
    ],
)
def test_an_engine_option_it_refuses_is_one_line_at_loading(engine, says, capsys, tmp_path):
    assert cli.main(["--model", str(TINY), "--engines", engine, *QUICK, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == f"loading {engine} ..." and len(err) == 2, err
    assert err[1].startswith("python -m benchmarks: error: ") and says in err[1], err


@pytest.mark.parametrize("option", ["--repeats", "--threads"])
def test_a_count_below_one_is_argparses_error(option, capsys):
    with pytest.raises(SystemExit) as raised:
        cli.main(["--model", str(TINY), option, "0"])
    assert raised.value.code == 2 and f"argument {option}: must be at least 1, got 0" in capsys.readouterr().err


def test_an_output_folder_that_cannot_be_written_is_said_before_the_run(capsys, monkeypatch, tmp_path):
    def never(settings):
        raise AssertionError("the benchmark ran before its output folder was checked")

    monkeypatch.setattr(runner, "run", never)
    (tmp_path / "a-file").write_text("")
    assert cli.main(["--model", str(TINY), *QUICK, "--out", str(tmp_path / "a-file" / "results")]) == 2
    assert "error: cannot write results to" in capsys.readouterr().err


def test_bad_engine_from_the_shell_prints_no_traceback():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--model", str(TINY), "--engines", "ch09"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("python -m benchmarks: error: unknown engine 'ch09'")


def test_nothing_measured_exits_non_zero(monkeypatch, capsys, tmp_path):
    def unavailable(name, *args, **kwargs):
        raise EngineUnavailable(f"{name} is not installed")

    monkeypatch.setattr(runner, "create_engine", unavailable)
    argv = ["--model", str(TINY), "--workload", "mixed-small", "--engines", "ch01,llama.cpp", "--out", str(tmp_path)]
    assert cli.main([*argv, *QUICK]) == 1
    err = capsys.readouterr().err
    assert "nothing was measured (ch01: ch01 is not installed; llama.cpp: llama.cpp is not installed)" in err
    assert not (tmp_path / "results.json").exists()


def test_list_puts_stories260k_last_and_says_it_needs_shared(capsys, no_shared):
    assert cli.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "issue" not in out
    model_lines = out.split("workloads:")[0].splitlines()[1:]
    assert model_lines[-1].split()[0] == "stories260k" and model_lines[-1].endswith("(needs ../shared: absent here)")
    assert [line.split()[0] for line in model_lines[:-1]] == [m for m in models.MODELS if m != "stories260k"]
    assert "chNN@REF" in out


def test_threads_default_to_1_on_a_small_machine_and_say_so(monkeypatch):
    said: list[str] = []
    args = cli.build_parser().parse_args(["--model", str(TINY), "--engines", "ch01", "--workload", "mixed-small"])
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert cli.settings_from_args(args, log=said.append).threads == 1
    assert said and "2 CPUs here: --threads 1 by default" in said[0]
    said.clear()
    args.threads = 2  # asked for: kept, nothing said
    assert cli.settings_from_args(args, log=said.append).threads == 2 and not said
    args.threads = None
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert cli.settings_from_args(args, log=said.append).threads is None and not said


def test_nanovllm_bench_is_the_benchmark(capsys, monkeypatch):
    from nanovllm import cli as engine_cli

    assert engine_cli.main(["bench", "--list"]) == 0
    assert "engines here: ch01" in capsys.readouterr().out
    assert engine_cli.main(["bench", "--model", str(TINY), "--engines", "ch09"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("nanovllm bench: error: unknown engine 'ch09'")
    assert "bench" in engine_cli.build_parser().format_help()
    monkeypatch.setitem(sys.modules, "benchmarks.cli", None)  # an installed package without a clone beside it
    assert engine_cli.main(["bench", "--list"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs the benchmarks package of a clone" in err and "inside the clone" in err


def test_nanovllm_bench_from_the_installed_command_anywhere(tmp_path):
    """The console script does not have the working folder on sys.path: a clone's editable install still finds it."""
    script = Path(sys.executable).parent / "nanovllm"
    if not script.exists():
        pytest.skip("the nanovllm command is not installed in this environment")
    done = subprocess.run(
        [str(script), "bench", "--model", str(TINY), "--engines", "ch09"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.startswith("nanovllm bench: error: unknown engine"), done.stderr
