"""The benchmark's own machinery: seeded workloads, identical prompts per engine, ratio math, JSON schema, plots."""

from __future__ import annotations

import importlib
import json
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from benchmarks import BenchError, cli, report
from benchmarks.engines import (
    ChapterEngine,
    Engine,
    EngineUnavailable,
    RunResult,
    canonical_name,
    chapter_packages,
    check_engine,
    create_engine,
    find_kv_tensors_bytes,
    llamacpp_installed,
    parse_option,
    step_tokens,
)
from benchmarks.llamacpp_server_engine import LlamaServerEngine
from benchmarks.measure import Measured, measure, percentile, ratios, run_metrics, summarize
from benchmarks.models import ROOT, ModelSpec, llama, param_count, resolve_model
from benchmarks.runner import Settings, choose_baseline, plan_engines
from benchmarks.targets import TARGETS, check_targets
from benchmarks.workloads import WORKLOADS, Request, Workload, get_spec, make_workload
from benchmarks.worktrees import worktrees_dir

TINY = Path(__file__).resolve().parent / "models" / "tiny-llama"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and a busy shared machine punishes a second one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_workload_is_seeded_and_identical_for_every_draw():
    spec = get_spec("mixed")
    a = make_workload(spec, 1000, 2048, avoid=(0, 1, 2))
    b = make_workload(spec, 1000, 2048, avoid=(0, 1, 2))
    assert a.requests == b.requests
    other = make_workload(spec, 1000, 2048, avoid=(0, 1, 2), variant=1)
    assert [(len(r.prompt), r.max_tokens) for r in other.requests] == [
        (len(r.prompt), r.max_tokens) for r in a.requests
    ], "a variant keeps the shape"
    assert [r.prompt for r in other.requests] != [r.prompt for r in a.requests], "... with fresh token ids"
    ids = {t for r in a.requests for t in r.prompt}
    assert ids.isdisjoint({0, 1, 2}) and max(ids) < 1000
    lo, hi = spec.prompt_len
    assert all(lo <= len(r.prompt) <= hi for r in a.requests) and len(a.requests) == spec.num_requests


def test_shared_prefix_and_fit_to_context():
    w = make_workload(get_spec("shared-prefix"), 500, 4096)
    prefix = w.requests[0].prompt[: w.spec.shared_prefix]
    assert all(r.prompt[: len(prefix)] == prefix for r in w.requests) and len(prefix) == 192
    big = make_workload(get_spec("nano-vllm-bench"), 512, 512)  # 1024 + 1024 does not fit 512 tokens
    assert max(len(r.prompt) + r.max_tokens for r in big.requests) < 512
    assert big.spec.notes and "scaled" in big.spec.notes[0]


def test_workload_options():
    spec = get_spec("decode-1").with_options(output_len=8, num_requests=2)
    assert spec.output_len == (8, 8) and spec.num_requests == 2
    assert get_spec("batch-4").num_requests == 4
    with pytest.raises(ValueError):
        get_spec("nope")
    with pytest.raises(ValueError):
        spec.with_options(colour=1)


class RecordingEngine(Engine):
    """Returns made-up tokens quickly and remembers every prompt it was given."""

    def __init__(self, name: str, speed: float = 1.0):
        self.name, self.kind, self.speed, self.seen = name, "fake", speed, []

    def run(self, requests: list[Request]) -> RunResult:
        self.seen.append([r.prompt for r in requests])
        return RunResult(1.0 / self.speed, [[7] * r.max_tokens for r in requests])


def test_every_engine_gets_identical_prompts_each_round():
    spec = get_spec("mixed-small")
    engines = [RecordingEngine("a"), RecordingEngine("b", speed=2.0)]
    m = measure(
        engines, lambda v: make_workload(spec, 300, 512, variant=v), repeats=3, warmup_tokens=4, log=lambda s: None
    )
    a, b = engines
    assert a.seen == b.seen and len(a.seen) == 4  # warm-up + 3 rounds
    assert len({json.dumps(p) for p in a.seen}) == 4, "each round draws fresh token ids"
    assert m.rounds["a"][0].output_tok_s * 2 == pytest.approx(m.rounds["b"][0].output_tok_s)
    s = summarize(m, "b", baseline="a")
    assert s["ratio_vs_baseline"] == pytest.approx(2.0) and s["same_tokens_as_baseline"] == 1.0


def _metrics(tok_s: list[float]):
    w = Workload(get_spec("batch-1"), [Request([5], 10)])
    return [run_metrics(w, RunResult(10 / t, [[1] * 10])) for t in tok_s]


def test_ratio_is_the_median_of_pairwise_rounds():
    a, b = _metrics([10, 20, 30]), _metrics([5, 10, 60])
    assert ratios(a, b) == pytest.approx([2.0, 2.0, 0.5])
    m = Measured(Workload(get_spec("batch-1"), [Request([5], 10)]), rounds={"a": a, "b": b})
    s = summarize(m, "a", "b")
    assert s["ratio_vs_baseline"] == pytest.approx(2.0)  # not 20 / 10 from the medians alone
    assert s["output_tok_s"] == pytest.approx(20.0)
    xs = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6]
    assert percentile(xs, 50) == pytest.approx(statistics.median(xs))
    assert percentile(xs, 99) == pytest.approx(float(torch.quantile(torch.tensor(xs), 0.99)))


def test_run_metrics_checks_counts_and_derives_ttft():
    w = Workload(get_spec("decode-1"), [Request([5, 6], 11)])
    m = run_metrics(w, RunResult(2.0, [[1] * 11]), ttft_run_s=0.5)
    assert m.ttft_s == {"median": 0.5, "p99": 0.5} and m.tpot_s["median"] == pytest.approx(0.15)
    # a streaming engine on one request: TTFT from the one-token run like everyone's, TPOT as streamed
    streamed = run_metrics(w, RunResult(2.0, [[1] * 11], ttft_s=[0.9], tpot_s=[0.1]), ttft_run_s=0.5)
    assert streamed.ttft_s == {"median": 0.5, "p99": 0.5} and streamed.tpot_s["median"] == pytest.approx(0.1)
    assert m.output_tok_s == pytest.approx(5.5) and m.total_tok_s == pytest.approx(6.5)
    with pytest.raises(RuntimeError, match="asked for 11"):
        run_metrics(w, RunResult(1.0, [[1] * 10]))


def test_check_targets_reads_pairwise_runs():
    runs = lambda xs: {"runs": [{"output_tok_s": x} for x in xs]}  # noqa: E731
    results = {
        "machine": {"device_type": "cpu"},
        "workloads": {"decode-1": {"engines": {"ch01": runs([10, 10, 10]), "ch02": runs([60, 40, 70])}}},
    }
    (t,) = check_targets(results)
    assert (t["engine"], t["ratio"], t["met"]) == ("ch02", 6.0, True)
    assert all(t.workload in WORKLOADS for t in TARGETS)


def test_names_and_options():
    assert canonical_name("chapters.ch01_naive") == "ch01" and canonical_name("hf") == "transformers"
    assert parse_option("ch03:kv_cache_memory=2e8") == ("ch03", "kv_cache_memory", 2e8)
    assert parse_option("transformers:attn_implementation=eager")[2] == "eager"
    assert cli.parse_sweep("ch04_continuous_batching:max_num_batched_tokens=64,128") == (
        "ch04",
        "max_num_batched_tokens",
        [64, 128],
    )
    with pytest.raises(ValueError):
        parse_option("ch03=1")
    assert chapter_packages()["ch01"] == "chapters.ch01_naive"


def test_step_tokens_accepts_the_usual_shapes():
    assert step_tokens({3: [5, 6], 4: 7}) == [(3, [5, 6]), (4, [7])]
    assert step_tokens([(3, 5), (4, [7])]) == [(3, [5]), (4, [7])]
    assert step_tokens([{"request_id": 1, "token_ids": [9]}]) == [(1, [9])]
    assert step_tokens(None) == []


def test_one_request_ttft_comes_from_a_one_token_run_on_a_fresh_prompt_for_every_engine():
    class Recording(Engine):
        def __init__(self, name, streams):
            self.name, self.streams, self.seen = name, streams, []

        def run(self, requests):
            self.seen.append([(tuple(r.prompt), r.max_tokens) for r in requests])
            tokens = [[1] * r.max_tokens for r in requests]
            streamed = [0.9] * len(requests) if self.streams else None
            return RunResult(1.0, tokens, streamed, [0.01] * len(requests) if self.streams else None)

    def make(variant):
        return make_workload(get_spec("decode-1"), 100, 400, variant=variant)

    engines = [Recording("plain", False), Recording("streaming", True)]
    m = measure(engines, make, repeats=2, warmup_tokens=0, log=lambda s: None)
    for e in engines:
        full, one_token = e.seen[0][0], e.seen[1][0]  # round 1: the full run, then the one-token run
        assert one_token[1] == 1 and len(one_token[0]) == len(full[0]) and one_token[0] != full[0]
        assert m.ttft_source[e.name] == "max_tokens=1 run"
        assert all(r.ttft_s["median"] == 1.0 for r in m.rounds[e.name])  # the one-token run's wall time
    assert [r.tpot_s["median"] for r in m.rounds["streaming"]] == [0.01, 0.01]  # streamed TPOT is kept


def test_streaming_chapter_engine_measures_ttft_and_tpot(monkeypatch):
    class LLM:
        def __init__(self, model, dtype=None, device="cpu", max_model_len=None, seed=0):
            self.left: dict[int, int] = {}

        def add_request(self, prompt, params):
            self.left[len(self.left)] = params.max_tokens
            return len(self.left) - 1

        def has_unfinished(self):
            return any(self.left.values())

        def step(self):
            out = {rid: [rid] for rid, n in self.left.items() if n}
            for rid in out:
                self.left[rid] -= 1
            return out

    from nanovllm.sampling_params import SamplingParams

    monkeypatch.setitem(sys.modules, "fake_chapter", types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams))
    model = resolve_model(str(TINY))
    engine = ChapterEngine(
        "ch99", "fake_chapter", model, "cpu", "float32", shared={"max_model_len": 50, "kv_cache_memory": 123}
    )
    assert engine.streams
    assert engine.options == {"max_model_len": 50}, "shared settings go only to chapters that take them"
    result = engine.run([Request([5], 3), Request([6], 1)])
    assert result.token_ids == [[0, 0, 0], [1]]
    assert len(result.ttft_s) == 2 and result.tpot_s[1] == 0.0 and result.tpot_s[0] >= 0.0


def test_find_kv_tensors_bytes():
    holder = types.SimpleNamespace(kv_cache=torch.zeros(2, 4, 8), model=torch.nn.Linear(4, 4), other=[1, 2])
    assert find_kv_tensors_bytes(holder) == 2 * 4 * 8 * 4
    net = torch.nn.Linear(4, 4)
    net.k_cache = torch.zeros(16)
    assert find_kv_tensors_bytes(types.SimpleNamespace(model=net)) == 64
    assert find_kv_tensors_bytes(types.SimpleNamespace(model=torch.nn.Linear(4, 4))) is None


def test_random_model_build_is_cached_and_loadable(tmp_path, monkeypatch):
    from benchmarks import models
    from nanovllm.utils.loader import load_model

    spec = ModelSpec("llama-test", "tiny", llama(32, 2, 2, 64, 300, tied=False, kv_heads=1, max_len=128))
    monkeypatch.setitem(models.MODELS, spec.name, spec)
    m = resolve_model(spec.name, cache=tmp_path)
    mtime = (m.path / "model.safetensors").stat().st_mtime
    assert resolve_model(spec.name, cache=tmp_path).path == m.path
    assert (m.path / "model.safetensors").stat().st_mtime == mtime, "a second resolve reuses the build"
    loaded = load_model(m.path)
    assert sum(p.numel() for p in loaded.model.parameters()) == param_count(spec.config)
    assert loaded.tokenizer.decode([5, 6]) == "t5 t6"


def test_llamacpp_is_optional(tmp_path):
    if llamacpp_installed():
        pytest.skip("llama-cpp-python is installed here")
    with pytest.raises(EngineUnavailable, match="not installed"):
        create_engine("llama.cpp", resolve_model(str(TINY)), "cpu", "float32", {})
    spm = pytest.importorskip("sentencepiece")
    from benchmarks.llamacpp_engine import standin_sentencepiece

    (tmp_path / "t.model").write_bytes(standin_sentencepiece(300))
    sp = spm.SentencePieceProcessor()
    sp.LoadFromFile(str(tmp_path / "t.model"))
    assert sp.vocab_size() == 300 and sp.id_to_piece(7) == "\u2581t7" and sp.is_control(2)


def test_command_writes_json_table_and_plots(tmp_path, capsys):
    """One short real run: ch01 against transformers (batched, left padding) on a tiny model."""
    out = tmp_path / "run"
    argv = [
        "--model",
        str(TINY),
        "--workload",
        "decode-1,mixed-small",
        "--batch-sizes",
        "1,2",
        "--engines",
        "ch01,transformers",
        "--sweep",
        "transformers:batch_size=1,2",
        "--engine-opt",
        "ch01:seed=0",
        "--workload-opt",
        "output_len=(3,6)",
        "--workload-opt",
        "prompt_len=(2,9)",
        "--repeats",
        "2",
        "--warmup",
        "2",
        "--threads",
        "1",
        "--baseline",
        "ch01",
        "--out",
        str(out),
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert set(report.TOP_KEYS) <= set(results) and set(report.MACHINE_KEYS) <= set(results["machine"])
    assert results["machine"]["threads"] == 1 and results["settings"]["repeats"] == 2
    assert results["settings"]["chapter_settings"]["max_model_len"] == 9 + 6 + 1  # the longest request, + 1
    for name, wl in results["workloads"].items():
        assert set(report.WORKLOAD_KEYS) <= set(wl), name
        assert set(wl["engines"]) == {"ch01", "transformers[batch_size=1]", "transformers[batch_size=2]"}
        for row in wl["engines"].values():
            assert set(report.ENGINE_KEYS) <= set(row) and len(row["runs"]) == 2
            assert row["same_tokens_as_baseline"] == 1.0, "greedy transformers must agree with chapter 1"
    d1 = results["workloads"]["decode-1"]["engines"]["ch01"]
    assert d1["ttft_source"] == "max_tokens=1 run" and d1["tpot_s"]["median"] > 0 and d1["roofline_fraction"] > 0
    assert d1["ratio_vs_baseline"] == 1.0 and d1["kv_cache_bytes"] == 0
    # one request, n new tokens: the naive loop and transformers' generate each run the model n times
    n = results["workloads"]["decode-1"]["output_tokens"]
    assert d1["forward_passes"] == n
    assert results["workloads"]["decode-1"]["engines"]["transformers[batch_size=1]"]["forward_passes"] == n
    assert "| decode-1 | ch01 |" in printed and (out / "table.md").read_text().startswith("model tiny-llama")
    for png in ("ladder.png", "batch_scaling.png", "sweep_transformers_batch_size.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_stories260k_through_transformers_matches_chapter_1(stories260k, tmp_path, monkeypatch):
    """The llama2.c checkpoint converted for transformers holds the same weights the chapters read."""
    monkeypatch.setenv("NANOVLLM_BENCH_CACHE", str(tmp_path))
    model = resolve_model(str(stories260k))
    assert model.path == stories260k and (model.hf_path / "model.safetensors").is_file()
    w = make_workload(
        get_spec("mixed-small").with_options(output_len=12), model.vocab_size, model.max_model_len, model.special_ids
    )
    hf = create_engine("transformers", model, "cpu", "float32", {"batch_size": 4}).run(w.requests)
    ch01 = create_engine("ch01", model, "cpu", "float32", {}).run(w.requests)
    assert hf.token_ids == ch01.token_ids


def test_breakdown_parts_add_up_and_count_passes(capsys, tmp_path):
    """`python -m benchmarks.breakdown`: the parts sum to the wall time, each measured part took time."""
    from benchmarks import breakdown

    model = resolve_model(str(TINY))
    w = make_workload(get_spec("decode-1").with_options(output_len=5), model.vocab_size, model.max_model_len)
    engine = create_engine("ch02", model, "cpu", "float32", {}, {"max_model_len": 64})
    row = breakdown.breakdown(engine, w.requests)
    assert row["forward_passes"] == 5  # a prefill, then one decode per further token
    assert sum(row["seconds"].values()) == pytest.approx(row["wall_s"])
    assert all(row["seconds"][p] > 0 for p in ("weights", "logits", "attention"))
    argv = ["--model", str(TINY), "--workload", "mixed-small", "--engines", "ch03,ch04", "--out", str(tmp_path)]
    assert breakdown.main(argv) == 0
    table = capsys.readouterr().out
    assert "| ch03 |" in table and "| ch04 |" in table and "| ch03 / ch04 |" in table
    saved = json.loads((tmp_path / "breakdown.json").read_text())
    assert set(saved["engines"]) == {"ch03", "ch04"} and "| ch03 / ch04 |" in (tmp_path / "breakdown.md").read_text()


def test_breakdown_splits_a_decode_step_into_parts_that_add_up_and_puts_host_time_in_host():
    """decode-1's step split: weight reads + matmuls over the roofline + attention + host = the step time; a sleep
    injected into the engine's host code (before each step, outside the model) lands in host, and nowhere else."""
    from benchmarks import breakdown

    class SlowHost(Engine):
        """A chapter engine that sleeps in host code at every step, as slow Python would."""

        def __init__(self, inner: Engine, seconds: float):
            self.inner, self.llm, self.seconds = inner, inner.llm, seconds

        def run(self, requests):
            step = self.llm.step

            def slow_step():
                time.sleep(self.seconds)
                return step()

            self.llm.step = slow_step
            try:
                return self.inner.run(requests)
            finally:
                del self.llm.step

    model = resolve_model(str(TINY))
    w = make_workload(get_spec("decode-1").with_options(output_len=24), model.vocab_size, model.max_model_len)
    engine = create_engine("ch06", model, "cpu", "float32", {}, {"max_model_len": 64})
    engine.run(w.requests)  # warm-up
    plain = breakdown.breakdown(engine, w.requests)
    # 24 passes: the prompt, then 23 decodes of which the last has no next pass to end it
    assert plain["forward_passes"] == 24 and len(plain["decode_steps"]) == 22
    linears = {
        m.weight.data_ptr(): m.weight.nbytes for m in engine.llm.model.modules() if isinstance(m, torch.nn.Linear)
    }
    assert plain["weight_bytes"] == sum(linears.values()), "every matrix a step multiplies by, the tied lm_head once"
    unfused = create_engine("ch05", model, "cpu", "float32", {}, {"max_model_len": 64})
    assert breakdown.breakdown(unfused, w.requests[:1])["weight_bytes"] == plain["weight_bytes"], "fusing reads as much"
    split = breakdown.split_step(plain["decode_steps"], plain["weight_bytes"], read_bytes_s=20e9)
    assert sum(split[p] for p in breakdown.STEP_PARTS) == pytest.approx(split["step"], rel=1e-9)
    assert split["reads"] == pytest.approx(plain["weight_bytes"] / 20e9 * 1e3)
    assert split["reads"] + split["over_roofline"] == pytest.approx(split["matmuls"])
    assert 0 < split["step"] * 22 / 1e3 < plain["wall_s"], "the steps lie inside the run"
    assert all(split[p] > 0 for p in ("matmuls", "attention", "host"))

    sleep_ms = 5.0
    slow = breakdown.breakdown(SlowHost(engine, sleep_ms / 1e3), w.requests)
    slow_split = breakdown.split_step(slow["decode_steps"], slow["weight_bytes"], read_bytes_s=20e9)
    assert sum(slow_split[p] for p in breakdown.STEP_PARTS) == pytest.approx(slow_split["step"], rel=1e-9)
    assert 0.9 * sleep_ms < slow_split["host"] - split["host"] < sleep_ms + 3, (split, slow_split)
    for part in ("matmuls", "attention"):
        assert abs(slow_split[part] - split[part]) < 1.0, (part, split, slow_split)
    # in this thread's CPU time (--clock cpu) a sleep is no work: it does not show
    cpu = breakdown.breakdown(SlowHost(engine, sleep_ms / 1e3), w.requests, clock=time.thread_time)
    cpu_split = breakdown.split_step(cpu["decode_steps"], cpu["weight_bytes"], read_bytes_s=20e9)
    assert cpu_split["host"] < split["host"] + sleep_ms / 2, (split, cpu_split)
    assert "step" not in vars(engine.llm), "the engine is as it was"


def test_breakdown_command_prints_and_saves_the_decode_step_table(capsys, tmp_path):
    from benchmarks import breakdown

    argv = ["--model", str(TINY), "--workload", "decode-1", "--engines", "ch05,ch06", "--threads", "1"]
    assert breakdown.main([*argv, "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| engine | step ms | weight reads at " in table and "| ch05 − ch06 |" in table
    saved = json.loads((tmp_path / "breakdown.json").read_text())
    assert saved["read_bandwidth_bytes_s"] > 1e8 and "| ch06 |" in (tmp_path / "breakdown.md").read_text()
    step = saved["engines"]["ch06"]["decode_step_ms"]
    assert sum(step[p] for p in breakdown.STEP_PARTS) == pytest.approx(step["step"])
    assert step["untimed_step"] > 0 and step["weight_bytes"] > 0 and len(step["step_per_round"]) == 1


def test_read_bandwidth_and_chapter_6_graph_info():
    from benchmarks.measure import read_bandwidth

    assert read_bandwidth(mib=16, repeats=2) > 1e8  # bytes/s: any machine reads faster than 100 MB/s
    model = resolve_model(str(TINY))
    engine = create_engine("ch06", model, "cpu", "float32", {"enforce_eager": False}, {"max_model_len": 64})
    graphs = engine.info()["decode_graphs"]
    assert graphs["buckets"][:4] == [1, 2, 4, 8] and graphs["captured"] == []  # a CPU replays eagerly: no graphs
    assert graphs["capture_seconds"] is None and graphs["graph_memory_bytes"] is None
    assert "decode_graphs" not in create_engine("ch05", model, "cpu", "float32", {}).info()
    assert get_spec("decode-8").num_requests == 8 and get_spec("decode-8").output_len == (256, 256)


def test_gpu_sh_prints_chapter_6_ratios_targets_and_graphs(tmp_path):
    """The CUDA-graph section of benchmarks/gpu.sh reports from results.json: ratios, targets, graphs (made-up data)."""
    script = (ROOT / "benchmarks" / "gpu.sh").read_text()
    assert "--workload decode-1,decode-8 --engines ch05,ch06 --baseline ch05" in script
    report_py = script.split('"$PY" - "$OUT/cuda-graphs/results.json" <<\'EOF\'\n', 1)[1].split("\nEOF\n", 1)[0]
    rows = {"ch05": {"output_tok_s": 100.0}, "ch06": {"output_tok_s": 250.0}}
    rows["ch06"].update(ratio_vs_baseline=2.5, same_tokens_as_baseline=1.0)
    eight = {"ch05": {"output_tok_s": 800.0}, "ch06": {"output_tok_s": 960.0}}
    eight["ch06"].update(ratio_vs_baseline=1.2, same_tokens_as_baseline=1.0)
    graphs = {"buckets": [1, 2], "captured": [1, 2], "capture_seconds": 3.5, "graph_memory_bytes": 64 * 2**20}
    results = {
        "workloads": {"decode-1": {"engines": rows}, "decode-8": {"engines": eight}},
        "engines": {"ch05": {}, "ch06": {"decode_graphs": graphs}},
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    run = subprocess.run(
        [sys.executable, "-", str(tmp_path / "results.json")], input=report_py, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert "decode-1: ch05 100.0, ch06 250.0 tok/s: 2.50x (target >= 2.0x) PASS" in run.stdout
    assert "decode-8: ch05 800.0, ch06 960.0 tok/s: 1.20x (target >= 1.3x) FAIL" in run.stdout
    assert "2 graphs (batch sizes [1, 2]) captured in 3.50 s, graph memory 64 MiB" in run.stdout


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_chapter_at_a_commit_runs_in_its_own_process_beside_todays(tmp_path, capsys):
    """ch04@HEAD: HEAD's chapter 4 in a worker process on its own worktree, interleaved with today's chapter 4 (A B A B)
    and measured the same way: the same tokens, forward passes, streamed TTFT/TPOT; ratios to the first engine."""
    argv = ["--model", str(TINY), "--workload", "mixed-small", "--engines", "ch04,ch04@HEAD", "--repeats", "2"]
    argv += ["--workload-opt", "output_len=(3,6)", "--workload-opt", "prompt_len=(2,9)", "--warmup", "2"]
    assert cli.main([*argv, "--threads", "1", "--no-plots", "--no-bandwidth", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    rounds = [line.split(":")[0].strip() for line in err.splitlines() if line.strip().startswith("round ")]
    assert rounds == ["round 1/2 ch04", "round 1/2 ch04@HEAD", "round 2/2 ch04", "round 2/2 ch04@HEAD"]
    results = json.loads((tmp_path / "results.json").read_text())
    info = results["engines"]["ch04@HEAD"]
    worktree = Path(info["worktree"])
    assert info["commit"] == _git("rev-parse", "HEAD") and info["process"] == "worker" and info["streams"]
    assert worktree == worktrees_dir() / info["commit"] and (worktree / "chapters").is_dir()
    assert Path(info["source"]).is_relative_to(worktree), "the worker imports the commit's chapter, not this tree's"
    assert results["settings"]["baseline"] == "ch04", "no transformers: ratios to the first engine"
    today, at_head = results["workloads"]["mixed-small"]["engines"].values()
    assert at_head["same_tokens_as_baseline"] == 1.0 and at_head["ratio_vs_baseline"] > 0
    assert at_head["forward_passes"] == today["forward_passes"] and at_head["kv_cache_bytes"] == today["kv_cache_bytes"]
    assert at_head["ttft_s"] and at_head["tpot_s"] and at_head["run_mem_bytes"] is not None
    assert info["load_mem_bytes"] > 0


def test_chapter_at_a_commit_fails_in_one_line_for_an_unknown_ref_or_chapter(capsys):
    with pytest.raises(BenchError, match="no-such-ref-x: no such commit"):
        check_engine("ch04@no-such-ref-x")
    first = _git("rev-list", "--max-parents=0", "HEAD").split()[0]
    with pytest.raises(BenchError, match=f"commit {first[:10]} has no chapter ch04 \\(it has: ch01"):
        check_engine(f"ch04_continuous_batching@{first}")
    with pytest.raises(BenchError, match="only chapters"):
        check_engine("transformers@HEAD")
    assert canonical_name("chapters.ch04_continuous_batching@HEAD~1") == "ch04@HEAD~1"
    assert cli.main(["--model", str(TINY), "--engines", "ch01,ch09@HEAD", "--no-bandwidth"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("has no chapter ch09 (it has: ch01, ch02, ch03, ch04)") or "has no chapter ch09" in err
    assert len(err.splitlines()) == 1 and err.startswith("python -m benchmarks: error: commit ")


def test_a_long_run_tells_how_far_it_has_got():
    """A run longer than progress_s logs, every progress_s, its time so far and the engine's request counter."""

    class Slow(RecordingEngine):
        def run(self, requests):
            time.sleep(0.25)
            return super().run(requests)

        def progress(self):
            return "1/8 requests done"

    lines: list[str] = []
    spec = get_spec("mixed-small")
    measure([Slow("slow")], lambda v: make_workload(spec, 300, 512, variant=v), 1, 0, log=lines.append, progress_s=0.05)
    ticks = [line for line in lines if "round 1/1 slow:" in line and "so far" in line]
    assert ticks and ticks[0].endswith("s so far, 1/8 requests done"), lines


@pytest.mark.parametrize("chapter", ["ch01", "ch02", "ch04"])
def test_chapter_engines_count_finished_requests_during_a_run(chapter):
    """The request counter the progress lines show, seen from inside the run (at every forward pass)."""
    import tqdm.auto

    model = resolve_model(str(TINY))
    engine = create_engine(chapter, model, "cpu", "float32", {"max_num_seqs": 2} if chapter == "ch02" else {})
    seen = []
    engine.llm.model.register_forward_pre_hook(lambda m, a: seen.append(engine.done))
    engine.run([Request([5 + i, 6, 7], i + 1) for i in range(4)])  # 1, 2, 3 and 4 new tokens
    assert seen[0] == 0 and seen == sorted(seen) and 0 < max(seen) < 4, seen
    assert engine.progress() == f"4/4 requests done, {len(seen)} forward passes"
    if chapter == "ch01":  # one request at a time, a pass per token: the counter steps between requests
        assert seen == [0, 1, 1, 2, 2, 2, 3, 3, 3, 3]
        assert importlib.import_module("chapters.ch01_naive.llm").tqdm is tqdm.auto.tqdm, "the chapter's bar is back"


def test_ratios_by_default_and_a_no_ratios_message_that_says_what_to_do():
    lines: list[str] = []
    assert choose_baseline(None, ["ch01", "transformers"], lines.append) == "transformers"
    assert choose_baseline(None, ["ch02", "ch04"], lines.append) == "ch02"
    assert choose_baseline("none", ["ch02"], lines.append) is None and not lines
    assert choose_baseline("ch09", ["ch02", "ch04"], lines.append) is None
    assert "pass --baseline with one of the engines run (ch02, ch04)" in lines[0]
    results = {"machine": {"device": "cpu", "torch": "2", "threads": 1}, "model": {"name": "m", "params": 1}}
    results["model"]["dtype"], results["settings"] = "float32", {"repeats": 1, "baseline": None}
    assert "no ratios (pass --baseline ENGINE" in report.header(results)


def test_a_chapter_at_a_commit_takes_the_chapters_options_then_its_own():
    s = Settings(engines=["ch04", "ch04@HEAD"], engine_options={"ch04": {"a": 1}, "ch04@HEAD": {"a": 2, "b": 3}})
    assert plan_engines(s) == [("ch04", "ch04", {"a": 1}), ("ch04@HEAD", "ch04@HEAD", {"a": 2, "b": 3})]
    s = Settings(engines=["ch04@HEAD"], sweeps={"ch04@HEAD": ("a", [1, 2])})
    assert [display for display, _, _ in plan_engines(s)] == ["ch04@HEAD[a=1]", "ch04@HEAD[a=2]"]
    assert cli.parse_sweep("ch04@HEAD:a=1,2") == ("ch04@HEAD", "a", [1, 2])


def test_an_engine_can_run_twice_with_options_of_its_own():
    """ENGINE[KEY=VALUE,...] in --engines: the same chapter beside itself with other options (ch07 in fp32, int8,
    int4), named as a --sweep names its variants; commas inside the brackets do not split the list."""
    from benchmarks.engines import engine_base, inline_options, split_top_level

    assert split_top_level("ch04, ch07[a=1,b=(2,3)],,llamacpp") == ["ch04", "ch07[a=1,b=(2,3)]", "llamacpp"]
    assert canonical_name("ch07_quantization [quantization=int8, quantize_lm_head=False]") == (
        "ch07[quantization=int8,quantize_lm_head=False]"
    )
    assert inline_options("ch07[quantization=int4-g64,kv_cache_memory=2e8]") == {
        "quantization": "int4-g64",
        "kv_cache_memory": 2e8,
    }
    assert engine_base("ch07@HEAD[quantization=int8]") == "ch07@HEAD" and inline_options("ch07") == {}
    for bad in ("ch07[quantization]", "ch07[=int8]"):
        with pytest.raises(BenchError, match="not KEY=VALUE"):
            check_engine(bad)
    engines = "ch04,ch04[max_num_batched_tokens=32],ch04[max_num_batched_tokens=64,seed=1]"
    argv = ["--model", str(TINY), "--engines", engines, "--engine-opt", "ch04:seed=0", "--threads", "1"]
    s = cli.settings_from_args(
        cli.build_parser().parse_args([*argv, "--engine-opt", "ch04[max_num_batched_tokens=64,seed=1]:x=2"])
    )
    # the chapter's own options (ch04:...), then the name's, then the name's --engine-opt
    assert plan_engines(s) == [
        ("ch04", "ch04", {"seed": 0}),
        (
            "ch04[max_num_batched_tokens=32]",
            "ch04[max_num_batched_tokens=32]",
            {"seed": 0, "max_num_batched_tokens": 32},
        ),
        (
            "ch04[max_num_batched_tokens=64,seed=1]",
            "ch04[max_num_batched_tokens=64,seed=1]",
            {"seed": 1, "max_num_batched_tokens": 64, "x": 2},
        ),
    ]


def test_two_variants_of_one_chapter_run_in_one_benchmark(tmp_path):
    """End to end: a chapter and the same chapter with an option of its own, measured side by side."""
    argv = ["--model", str(TINY), "--workload", "mixed-small", "--engines", "ch04,ch04[max_num_batched_tokens=16]"]
    argv += ["--workload-opt", "output_len=(3,6)", "--workload-opt", "prompt_len=(2,9)", "--warmup", "2"]
    argv += ["--repeats", "1", "--threads", "1", "--no-plots", "--no-bandwidth", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    variant = results["engines"]["ch04[max_num_batched_tokens=16]"]
    assert variant["options"]["max_num_batched_tokens"] == 16
    assert "max_num_batched_tokens" not in results["engines"]["ch04"]["options"]
    assert (
        results["workloads"]["mixed-small"]["engines"]["ch04[max_num_batched_tokens=16]"]["same_tokens_as_baseline"]
        == 1.0
    )


def test_llamacpp_quantized_engine_names():
    """llamacpp-q8_0, llama.cpp-Q4_0, ...: llama.cpp on a GGUF of that type, one name per type; unknown types fail
    in one line, before anything runs, whether or not llama-cpp-python is installed."""
    assert canonical_name("llamacpp-q8_0") == "llama.cpp-q8_0" and canonical_name("llama-cpp-Q4_0") == "llama.cpp-q4_0"
    assert canonical_name("llamacpp-q4_k_m[pure=True]") == "llama.cpp-q4_K_M[pure=True]"
    assert canonical_name("llamacpp") == "llama.cpp"
    check_engine("llamacpp-q4_0")
    with pytest.raises(BenchError, match="not a GGUF type.*q8_0, q4_0"):
        check_engine("llamacpp-q9_9")
    if not llamacpp_installed():
        with pytest.raises(EngineUnavailable, match="not installed"):
            create_engine("llamacpp-q4_0", resolve_model(str(TINY)), "cpu", "float32", {})


def _gguf_header(tensors: list[tuple[str, int]]) -> bytes:
    """A GGUF v3 header by hand: two metadata values (a string, an array of strings), then one 2-D tensor info per
    (name, ggml type id)."""
    import struct

    def string(s: str) -> bytes:
        return struct.pack("<Q", len(s)) + s.encode()

    kv = string("general.name") + struct.pack("<I", 8) + string("tiny")
    kv += string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2) + string("a") + string("bc")
    body = b"".join(string(n) + struct.pack("<IQQIQ", 2, 64, 32, t, 0) for n, t in tensors)
    return b"GGUF" + struct.pack("<IQQ", 3, len(tensors), 2) + kv + body


def test_gguf_tensor_types_are_read_from_the_header(tmp_path):
    from benchmarks.llamacpp_engine import gguf_tensor_types

    path = tmp_path / "m.gguf"
    path.write_bytes(_gguf_header([("blk.0.attn_q.weight", 2), ("blk.0.ffn_up.weight", 2), ("output.weight", 14)]))
    assert gguf_tensor_types(path) == {"q4_0": 2, "q6_K": 1}
    path.write_bytes(b"not a gguf")
    assert gguf_tensor_types(path) == {}


def test_llamacpp_runs_quantized_gguf(tmp_path, monkeypatch):
    """Where llama-cpp-python and its converter are here: q8_0 straight from the converter, q4_0 through llama.cpp's
    quantizer (pure: every matrix q4_0), each cached and recorded in info()."""
    if not llamacpp_installed():
        pytest.skip("llama-cpp-python is not installed (optional)")
    from benchmarks.llamacpp_engine import find_converter

    if find_converter() is None:
        pytest.skip("no convert_hf_to_gguf.py (set LLAMA_CPP_CONVERTER)")
    monkeypatch.setenv("NANOVLLM_BENCH_CACHE", str(tmp_path))
    model = resolve_model(str(TINY))
    for name, kind in (("llamacpp-q8_0", "q8_0"), ("llamacpp-q4_0[pure=True]", "q4_0")):
        engine = create_engine(name, model, "cpu", "float32", {})
        info = engine.info()
        assert info["outtype"] == kind and kind in info["gguf_tensor_types"] and str(tmp_path) in info["gguf"]
        out = engine.run([Request([3, 4, 5, 6], 5)])
        assert len(out.token_ids[0]) == 5 and len(out.ttft_s) == 1
        engine.close()
    assert info["pure"] and set(info["gguf_tensor_types"]) <= {"q4_0", "f32"}


FAKE_LLAMA_SERVER = r'''#!/usr/bin/env python3
"""A stand-in llama-server: /health, and /completion streaming tokens (prompt[-1] + i) % 50 as llama-server's
stream does; it records its command line and every request body in $FAKE_LOG."""
import json, os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

argv = sys.argv[1:]
log = open(os.environ["FAKE_LOG"], "a")
log.write(json.dumps({"argv": argv}) + "\n"); log.flush()

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args): pass
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"{}")
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        log.write(json.dumps({"path": self.path, "body": body}) + "\n"); log.flush()
        self.send_response(200); self.send_header("Content-Type", "text/event-stream"); self.end_headers()
        for i in range(body["n_predict"]):
            chunk = {"content": "x", "tokens": [(body["prompt"][-1] + i) % 50], "stop": False}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode()); self.wfile.flush()
        self.wfile.write(b'data: {"content": "", "tokens": [], "stop": true}\n\n'); self.wfile.flush()
        self.close_connection = True

ThreadingHTTPServer(("127.0.0.1", int(argv[argv.index("--port") + 1])), Handler).serve_forever()
'''


def test_llama_server_engine_names_and_absence(monkeypatch, tmp_path):
    """llama-server, llamacpp-server-q8_0, ...: llama.cpp's own server on a GGUF of that type; without a binary it is
    skipped in one line that says how to build one."""
    assert canonical_name("llamacpp-server") == "llama-server" and canonical_name("llama.cpp-server") == "llama-server"
    assert canonical_name("llama-server-Q8_0") == "llama-server-q8_0"
    assert canonical_name("llamacpp-server-q4_0[parallel=16]") == "llama-server-q4_0[parallel=16]"
    check_engine("llama-server-q4_0")
    with pytest.raises(BenchError, match="not a GGUF type"):
        check_engine("llama-server-q9_9")
    monkeypatch.setenv("LLAMA_SERVER", str(tmp_path / "absent"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(EngineUnavailable, match="build_llama_server.sh"):
        create_engine("llama-server", resolve_model(str(TINY)), "cpu", "float32", {})


def test_llama_server_engine_drives_the_server(monkeypatch, tmp_path):
    """Against a stand-in server: one slot per sequence, enough context for every slot, token-id prompts, greedy,
    EOS ignored, no prompt cache, every request sent at once, tokens read from the stream, the server stopped."""
    fake = tmp_path / "llama-server"
    fake.write_text(FAKE_LLAMA_SERVER)
    fake.chmod(0o755)
    log = tmp_path / "log.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(log))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(_gguf_header([("blk.0.attn_q.weight", 0)]))
    engine = create_engine(
        "llama-server[parallel=3,ctx_per_slot=64]",
        resolve_model(str(TINY)),
        "cpu",
        "float32",
        {"binary": str(fake), "gguf": str(gguf), "threads": 1},
    )
    try:
        requests = [Request([5, 6, 7], 4), Request([9], 2), Request([1, 2], 5)]
        result = engine.run(requests)
    finally:
        engine.close()
    assert engine.proc.poll() is not None  # stopped
    assert result.token_ids == [[(r.prompt[-1] + i) % 50 for i in range(r.max_tokens)] for r in requests]
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    argv = lines[0]["argv"]
    assert argv[argv.index("--parallel") + 1] == "3" and argv[argv.index("--ctx-size") + 1] == "192"
    assert "--no-kv-unified" in argv and argv[argv.index("-m") + 1] == str(gguf)
    bodies = sorted((entry["body"] for entry in lines[1:]), key=lambda b: b["prompt"])
    assert [b["prompt"] for b in bodies] == sorted(r.prompt for r in requests)
    for b in bodies:
        assert b["cache_prompt"] is False and b["ignore_eos"] is True and b["stream"] is True
        assert b["temperature"] == 0 and b["top_k"] == 1 and b["return_tokens"] is True
    assert engine.info()["kv_cache_type"].startswith("f16")
    with pytest.raises(EngineUnavailable, match="slot holds 64"):
        LlamaServerEngine.run(engine, [Request(list(range(60)), 8)])


def test_llama_server_gives_our_greedy_tokens():
    """The real llama-server (where one was built: tools/build_llama_server.sh) on the tiny model, fp32 weights and
    KV cache, decodes the tokens our final engine does, requests batched together."""
    from benchmarks.llamacpp_engine import find_converter
    from benchmarks.llamacpp_server_engine import find_llama_server

    if find_llama_server() is None or find_converter() is None:
        pytest.skip("no llama-server binary or GGUF converter here (optional: tools/build_llama_server.sh)")
    from nanovllm import LLM, SamplingParams

    requests = [Request([1, 17, 33, 90], 12), Request([1, 5], 20), Request(list(range(1, 40)), 9)]
    engine = create_engine("llama-server[kv_type=f32]", resolve_model(str(TINY)), "cpu", "float32", {"threads": 1})
    try:
        theirs = engine.run(requests).token_ids
    finally:
        engine.close()
    llm = LLM(str(TINY), seed=0)
    ours = [
        o["token_ids"]
        for o in llm.generate(
            [r.prompt for r in requests],
            [SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True) for r in requests],
            use_tqdm=False,
        )
    ]
    assert theirs == ours


def test_serve_engine_streams_the_offline_engines_tokens(tmp_path):
    """The `serve` engine (the final engine behind its HTTP server, every request its own streaming client) gives
    the offline engine's greedy tokens and per-request stream timings."""
    pytest.importorskip("uvicorn")
    argv = ["--model", str(TINY), "--workload", "mixed-small", "--engines", "ch07,serve", "--baseline", "ch07",
            "--workload-opt", "output_len=(3,6)", "--repeats", "1", "--warmup", "0", "--threads", "1",
            "--no-plots", "--no-bandwidth", "--out", str(tmp_path)]  # fmt: skip
    assert cli.main(argv) == 0
    served = json.loads((tmp_path / "results.json").read_text())["workloads"]["mixed-small"]["engines"]["serve"]
    assert served["same_tokens_as_baseline"] == 1.0
    assert served["ttft_s"]["median"] > 0 and served["ttft_source"] == "streamed"
