"""Tensor parallelism on the CPU (gloo, loopback, 1 thread a rank): TP=2 and TP=4 give TP=1's greedy tokens on every
family, the default model, stories260K and INT8; each rank holds its share of the weights; the step plan survives its
trip; a worker that dies stops the engine with a clear error and leaves no process behind; `nanovllm serve
--tensor-parallel-size 2` answers the openai client; torchrun starts the same engine."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import FAMILIES, ROOT, TINY_MODELS
from nanovllm import LLM, SamplingParams
from nanovllm.config import ModelConfig
from nanovllm.engine import llm_engine
from nanovllm.engine.tensor_parallel import WorkerDiedError, decode_step, encode_step, threads_per_rank
from nanovllm.layers.paged_attention import PrefillChunk, StepLayout
from nanovllm.models.sharding import shard_config, shard_tensor
from nanovllm.utils import loader

PROMPTS = ["Once upon a time", "The cat sat on the mat and", "hello " * 6, "Once upon a time there was"]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
# small steps and blocks: prompts are cut into chunks, and the last prompt reuses the first's cached blocks
OPTIONS = dict(kv_cache_memory=2**22, block_size=4, max_num_batched_tokens=8)
REFERENCE: dict[str, list[list[int]]] = {}


def tokens(model, tp: int = 1, prompts=PROMPTS, params=GREEDY, **options) -> list[list[int]]:
    with LLM(str(model), tensor_parallel_size=tp, **{**OPTIONS, **options}) as llm:
        return [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]


def reference(model, **options) -> list[list[int]]:
    key = f"{model}{sorted(options.items())}"
    if key not in REFERENCE:
        REFERENCE[key] = tokens(model, 1, **options)
    return REFERENCE[key]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # rank 0 passes its thread count on: 1 a rank, as on a machine with a core each
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_tensor_parallel_gives_one_process_tokens_on_every_family(family, tp):
    model = TINY_MODELS / family
    assert tokens(model, tp) == reference(model)


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_on_the_default_model(tp):
    prompts = ["The little dog", "Once upon a time, in a big forest,"]
    assert tokens("default", tp, prompts) == reference("default", prompts=prompts)


def test_tensor_parallel_on_stories260k(stories260k):
    assert tokens(stories260k, 2) == reference(stories260k)


@pytest.mark.parametrize("model", ["default", TINY_MODELS / "tiny-qwen2"])
def test_tensor_parallel_int8_gives_the_one_process_int8_tokens(model):
    """Each rank quantizes its own shard; a row-parallel layer takes its INT8 scales from the whole rows (an
    all-reduce of the row maxima), so the weights are the one-process engine's. At TP=2 every rank's share of a
    row-parallel input is a multiple of the C kernel's 32-value activation blocks, so the blocks are too."""
    assert tokens(model, 2, quantization="int8") == reference(model, quantization="int8")


def test_sampling_with_seeds_is_the_same_across_tensor_parallel_sizes():
    params = [SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, seed=s) for s in range(len(PROMPTS))]
    model = TINY_MODELS / "tiny-llama"
    assert tokens(model, 2, params=params) == tokens(model, 1, params=params)


def test_each_rank_holds_its_share_of_the_weights():
    full = LLM(str(TINY_MODELS / "tiny-llama"), kv_cache_memory=2**22, fuse_projections=False)
    with LLM(
        str(TINY_MODELS / "tiny-llama"), tensor_parallel_size=2, kv_cache_memory=2**22, fuse_projections=False
    ) as tp:
        layer, half = full.model.model.layers[0], tp.model.model.layers[0]
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert (
                getattr(half.self_attn.inner, name).weight.numel() * 2 == getattr(layer.self_attn, name).weight.numel()
            )
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert getattr(half.mlp.inner, name).weight.numel() * 2 == getattr(layer.mlp, name).weight.numel()
        assert tp.model.lm_head.inner.weight.numel() * 2 == full.model.lm_head.weight.numel()
        # rank 0's KV pool: its KV heads (1 of 2) per block, so twice the blocks in the same budget
        assert tp.pool.k.shape[3] == 1 and tp.pool.num_blocks == 2 * full.pool.num_blocks
        assert tp.weight_bytes < 0.6 * full.weight_bytes


class ReadCounter:
    """safe_open as the loader uses it, counting the bytes of every tensor or slice it hands out."""

    def __init__(self, monkeypatch):
        self.bytes = 0
        real = loader.safe_open

        def counted(*args, **kwargs):
            st = real(*args, **kwargs)
            counter = self

            class Counted:
                def __enter__(self):
                    self.st = st.__enter__()
                    return self

                def __exit__(self, *exc):
                    return st.__exit__(*exc)

                def keys(self):
                    return self.st.keys()

                def get_tensor(self, name):
                    return counter.count(self.st.get_tensor(name))

                def get_slice(self, name):
                    inner = self.st.get_slice(name)

                    class Slice:
                        get_shape = inner.get_shape

                        def __getitem__(self, index):
                            return counter.count(inner[index])

                    return Slice()

            return Counted()

        monkeypatch.setattr(loader, "safe_open", counted)

    def count(self, tensor: torch.Tensor) -> torch.Tensor:
        self.bytes += tensor.numel() * tensor.element_size()
        return tensor


class RankOf:
    """The rank and size load_model reads a shard for (nothing is sent: loading talks only for INT8 scales)."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size


def test_a_rank_reads_only_its_slices_of_the_checkpoint(monkeypatch):
    folder = TINY_MODELS / "tiny-qwen2"  # untied: the output layer is read (and cut) too
    reads = ReadCounter(monkeypatch)
    whole = loader.load_model(folder)
    file_bytes = reads.bytes
    reads.bytes = 0
    shard = loader.load_model(folder, tensor_parallel=RankOf(1, 2))
    assert sum(p.numel() for p in shard.model.parameters()) < 0.6 * sum(p.numel() for p in whole.model.parameters())
    assert reads.bytes < 0.6 * file_bytes  # half of every linear layer and of the vocabulary, the norms whole
    assert file_bytes == sum(f.stat().st_size for f in folder.glob("*.safetensors")) - header_bytes(folder)


def header_bytes(folder) -> int:
    """The JSON headers of a folder's safetensors files (8 bytes of length, then the header)."""
    return sum(8 + int.from_bytes(f.read_bytes()[:8], "little") for f in folder.glob("*.safetensors"))


def test_shards_put_back_together_are_the_checkpoint():
    cfg = ModelConfig.from_folder(TINY_MODELS / "tiny-gpt2")  # vocabulary 391: padded to 2 x 196
    g = torch.Generator().manual_seed(0)
    q = torch.randn(cfg.num_heads * cfg.head_dim, cfg.hidden_size, generator=g)
    assert torch.equal(torch.cat([shard_tensor("l.0.q_proj.weight", q, cfg, r, 2) for r in range(2)]), q)
    o = torch.randn(cfg.hidden_size, cfg.num_heads * cfg.head_dim, generator=g)
    assert torch.equal(torch.cat([shard_tensor("l.0.o_proj.weight", o, cfg, r, 4) for r in range(4)], dim=1), o)
    bias = torch.randn(cfg.hidden_size, generator=g)  # a row-parallel bias: added once, by rank 0
    assert sum(shard_tensor("l.0.down_proj.bias", bias, cfg, r, 2) for r in range(2)).equal(bias)
    vocab = torch.randn(cfg.vocab_size, cfg.hidden_size, generator=g)
    parts = [shard_tensor("model.embed_tokens.weight", vocab, cfg, r, 2) for r in range(2)]
    assert parts[0].shape == parts[1].shape == (196, cfg.hidden_size)
    assert torch.equal(torch.cat(parts)[: cfg.vocab_size], vocab) and not parts[1][-1].any()
    qkv = torch.cat([q, q + 1, q + 2])  # GPT-2's c_attn: each of q, k, v cut by heads
    mine = shard_tensor("l.0.qkv_proj.weight", qkv, cfg, 1, 2)
    assert torch.equal(mine, torch.cat([p.chunk(2)[1] for p in (q, q + 1, q + 2)]))


def test_fewer_kv_heads_than_ranks_replicates_the_one_each_rank_reads():
    cfg = ModelConfig.from_folder(TINY_MODELS / "tiny-llama")  # 4 query heads, 2 KV heads
    k = torch.arange(cfg.num_kv_heads * cfg.head_dim, dtype=torch.float32)[:, None].repeat(1, cfg.hidden_size)
    heads = [int(shard_tensor("l.0.k_proj.weight", k, cfg, r, 4)[0, 0]) // cfg.head_dim for r in range(4)]
    assert heads == [0, 0, 1, 1]  # query head r reads KV head r // 2
    assert shard_config(cfg, 4).num_kv_heads == 1


def test_cpu_ranks_share_the_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    torch.set_num_threads(4)
    assert [threads_per_rank(n, "cpu") for n in (1, 2, 4, 8)] == [4, 2, 1, 1]
    assert threads_per_rank(2, "cuda:0") == 4  # a GPU rank's threads only launch kernels
    seen = []
    with LLM(str(TINY_MODELS / "tiny-llama"), tensor_parallel_size=2, kv_cache_memory=2**22) as llm:
        llm.model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
        llm.generate(["Once upon a time"], GREEDY)
    assert seen and set(seen) == {2}  # rank 0 steps with its share, as the worker does
    assert torch.get_num_threads() == 4  # and the process keeps its own count (another engine may run in it)
    torch.set_num_threads(1)
    assert threads_per_rank(2, "cpu") == 1


def test_a_model_that_cannot_be_split_so_is_refused(monkeypatch):
    def no_workers(*args):
        raise AssertionError("workers were started for a model that was going to be refused")

    monkeypatch.setattr(llm_engine, "start_tensor_parallel", no_workers)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3.*(divide|KV heads)"):
        LLM(str(TINY_MODELS / "tiny-llama"), tensor_parallel_size=3, kv_cache_memory=2**22)
    with pytest.raises(FileNotFoundError, match="not found"):
        LLM(str(TINY_MODELS / "no-such-model"), tensor_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size must be"):
        LLM(str(TINY_MODELS / "tiny-llama"), tensor_parallel_size=0)


def test_the_step_plan_survives_encoding():
    layout = StepLayout(
        slots=torch.tensor([40, 9, 10, 11]),
        positions=torch.tensor([7, 0, 1, 2]),
        decode_tables=[[10, 3]],
        prefills=[PrefillChunk(1, 3, 0, [2])],
    )
    ids = torch.tensor([[5, 6, 7, 8]])
    got_ids, got, rows, copies = decode_step(encode_step(ids, layout, [0, 3], [(3, 4), (5, 6)]))
    assert torch.equal(got_ids, ids) and rows == [0, 3] and copies == [(3, 4), (5, 6)]
    assert torch.equal(got.slots, layout.slots) and torch.equal(got.positions, layout.positions)
    assert got.decode_tables == layout.decode_tables and got.prefills == layout.prefills


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie: dead, not yet reaped (only our own children could be; shutdown reaps them)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_shutdown_stops_every_worker():
    llm = LLM(str(TINY_MODELS / "tiny-llama"), tensor_parallel_size=4, kv_cache_memory=2**22)
    pids = [w.pid for w in llm.runner.workers]
    assert len(pids) == 3 and all(map(alive, pids))
    llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    llm.shutdown()
    llm.shutdown()  # twice is fine
    assert not any(map(alive, pids))
    with pytest.raises(WorkerDiedError, match="shut down"):
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)


def test_a_worker_that_dies_stops_the_engine_with_a_clear_error_and_no_hung_process():
    llm = LLM(str(TINY_MODELS / "tiny-llama"), tensor_parallel_size=4, kv_cache_memory=2**22)
    pids = [w.pid for w in llm.runner.workers]
    llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    os.kill(pids[1], signal.SIGKILL)  # rank 2
    start = time.monotonic()
    with pytest.raises(WorkerDiedError, match=r"rank 2 \(pid \d+\) exited with code -9"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert time.monotonic() - start < 60
    assert not any(map(alive, pids))
    assert not llm.has_unfinished()  # generate released its requests on the way out
    with pytest.raises(WorkerDiedError):  # and it stays stopped
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)


def test_a_failure_on_rank_0_mid_step_stops_the_workers(monkeypatch):
    llm = LLM(str(TINY_MODELS / "tiny-llama"), tensor_parallel_size=2, kv_cache_memory=2**22)
    pids = [w.pid for w in llm.runner.workers]

    def broken(*args):
        raise RuntimeError("injected")

    monkeypatch.setattr(llm.model.model.layers[1], "forward", broken)  # after the plan went out
    with pytest.raises(WorkerDiedError, match="failed on rank 0 .*injected"):
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    assert not any(map(alive, pids))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_serve_with_tensor_parallel_answers_the_openai_client():
    pytest.importorskip("fastapi", reason="the server needs the serve extra (fastapi, uvicorn)")
    openai = pytest.importorskip("openai")
    import httpx

    port, model = free_port(), str(TINY_MODELS / "tiny-llama")
    cmd = [sys.executable, "-m", "nanovllm", "serve", model, "--port", str(port), "--tensor-parallel-size", "2"]
    cmd += ["--kv-cache-memory", str(2**22)]
    server = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, "the server exited"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not start in 2 minutes"
            time.sleep(0.5)
        workers = children(server.pid)
        assert len(workers) == 1  # rank 1
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        answer = client.completions.create(model="tiny-llama", prompt=PROMPTS[1], max_tokens=10, temperature=0)
        offline = LLM(model, kv_cache_memory=2**22).generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=10))
        assert answer.choices[0].text == offline[0]["text"]
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    assert not any(map(alive, workers))


TORCHRUN_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from nanovllm import LLM, SamplingParams
llm = LLM(sys.argv[1], tensor_parallel_size=2, kv_cache_memory=2**22)  # rank 1 serves inside, then exits
out = llm.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
print("TOKENS", out[0]["token_ids"])
llm.shutdown()
"""


def test_torchrun_starts_the_same_engine(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(TORCHRUN_SCRIPT)
    model = TINY_MODELS / "tiny-llama"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    done = subprocess.run([*cmd, str(script), str(model)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("TOKENS")]
    assert lines == [f"TOKENS {reference(model, prompts=['Once upon a time'])[0]}"]
