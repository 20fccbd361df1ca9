"""The engine core under failure: interrupted and failing steps, bad requests beside good ones, other threads,
forks with copy-on-write, chapter 4's pinned configuration, and a randomized stress test of all of them at once."""

from __future__ import annotations

import ast
import inspect
import random
import threading
from pathlib import Path

import pytest
import torch

import nanovllm.engine.llm_engine as engine_module
from conftest import ROOT, TINY_MODELS
from nanovllm.config import ModelConfig
from nanovllm.engine.beam_search import BeamSearch, BeamSearchParams, update_searches
from nanovllm.engine.kv_cache import KVPool
from nanovllm.sampling_params import SamplingParams

pytestmark = pytest.mark.ch04
MODEL = str(TINY_MODELS / "tiny-llama")


def engine(blocks=None, block_size=4, **options):
    from chapters.ch04_continuous_batching import LLM

    if blocks is not None:
        cfg = ModelConfig.from_folder(MODEL)
        options["kv_cache_memory"] = blocks * KVPool.bytes_per_block(
            cfg.num_layers, block_size, cfg.num_kv_heads, cfg.head_dim, torch.float32
        )
    return LLM(MODEL, block_size=block_size, **options)


def greedy(n=8, **more):
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **more)


PROMPTS = [[1] + [(11 * i + 7 * j) % 380 + 3 for j in range(n)] for i, n in enumerate([9, 17, 4, 23, 12, 30])]


@pytest.fixture(scope="module")
def alone():
    """Each prompt's tokens, run alone in a fresh engine: what every run below must reproduce."""
    llm = engine()
    cache = {}

    def tokens(prompt, params):
        key = (tuple(prompt), repr(params))
        if key not in cache:
            cache[key] = llm.generate([prompt], params, use_tqdm=False)[0]["token_ids"]
        return cache[key]

    return tokens


class Fault:
    """Raises `error` from inside the forward pass (before layer `layer`) on the calls listed."""

    def __init__(self, llm, calls, error=RuntimeError, layer=1):
        self.calls, self.error, self.count = set(calls), error, 0
        self.handle = llm.model.model.layers[layer].register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.count += 1
        if self.count in self.calls:
            raise self.error("injected fault")

    def remove(self):
        self.handle.remove()


def assert_idle(llm):
    assert not llm.has_unfinished() and not llm.requests
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


# ---- defect 1: an interrupted step must not poison the prefix cache --------------------------------------


def test_an_interrupted_prefill_leaves_no_block_in_the_prefix_cache(alone):
    llm = engine()
    prompt = PROMPTS[5]  # 31 tokens: 7 full blocks of 4
    fault = Fault(llm, calls={1}, error=KeyboardInterrupt)  # layer 0 writes its K/V, layer 1 never does
    with pytest.raises(KeyboardInterrupt):
        llm.generate([prompt], greedy(), use_tqdm=False)
    fault.remove()
    for rid in list(llm.requests):
        llm.release(rid)
    assert not llm.block_manager.hash_to_block  # nothing whose K/V were not all written
    assert llm.generate([prompt], greedy(), use_tqdm=False)[0]["token_ids"] == alone(prompt, greedy())


# ---- defects 2 and 4: errors in generate and inside a step -----------------------------------------------


def test_an_interrupted_generate_leaves_nothing_behind(alone):
    llm = engine()
    fault = Fault(llm, calls={3}, error=KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS[:3], greedy(), use_tqdm=False)
    fault.remove()
    assert_idle(llm)
    outs = llm.generate(PROMPTS[3:5], greedy(), use_tqdm=False)
    assert [o["token_ids"] for o in outs] == [alone(p, greedy()) for p in PROMPTS[3:5]]


def test_a_released_or_unknown_request_is_a_key_error_naming_it():
    llm = engine()
    for params in (greedy(), SamplingParams(n=2, max_tokens=4)):  # result() of one sequence, and of candidates
        rid = llm.add_request(PROMPTS[0], params)
        llm.release(rid)
        for read in (llm.output, llm.result):
            with pytest.raises(KeyError, match=f"no request {rid}: unknown, or released"):
                read(rid)
    with pytest.raises(KeyError, match="no request 98765"):
        llm.result(98765)
    assert_idle(llm)


def fail_sampling_for(monkeypatch, temperature):
    """The sampler raises on any batch holding a row with this (marker) temperature."""
    real = engine_module.sample

    def sample(logits, batch):
        if (batch.temperature == temperature).any():
            raise FloatingPointError("injected sampling failure")
        return real(logits, batch)

    monkeypatch.setattr(engine_module, "sample", sample)


def test_a_request_whose_sampling_fails_finishes_with_an_error_and_spoils_no_other(monkeypatch, alone):
    llm = engine()
    fail_sampling_for(monkeypatch, 0.77)
    seeded = SamplingParams(temperature=0.9, max_tokens=8, seed=5, ignore_eos=True)
    bad = SamplingParams(temperature=0.77, max_tokens=8)
    outs = llm.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2]], [greedy(), bad, seeded], use_tqdm=False)
    assert outs[1]["finish_reason"] == "error" and "injected sampling failure" in outs[1]["error"]
    assert outs[0]["token_ids"] == alone(PROMPTS[0], greedy())
    assert outs[2]["token_ids"] == alone(PROMPTS[2], seeded)  # its random stream was rewound for the retry
    assert_idle(llm)
    assert llm.generate([PROMPTS[3]], greedy(), use_tqdm=False)[0]["token_ids"] == alone(PROMPTS[3], greedy())


def test_a_forward_that_raises_is_run_again_and_no_request_changes_its_tokens(alone):
    llm = engine(blocks=20, max_num_batched_tokens=8)  # chunked prefills, preemption
    ids = [llm.add_request(p, greedy(10)) for p in PROMPTS]
    fault = Fault(llm, calls={2, 5, 6, 11, 30})
    failures = steps = 0
    while llm.has_unfinished():
        steps += 1
        try:
            llm.step()
        except RuntimeError:
            failures += 1
        assert steps < 500
    fault.remove()
    assert failures == 5
    assert [llm.output(i)["token_ids"] for i in ids] == [alone(p, greedy(10)) for p in PROMPTS]
    for i in ids:
        llm.release(i)
    assert_idle(llm)


# ---- defect 9: generate() and the step API in one engine -------------------------------------------------


def test_generate_leaves_the_step_callers_outputs_to_it(alone):
    llm = engine()
    streamed = llm.add_request(PROMPTS[0], greedy(12))
    first = llm.step()
    mine = llm.generate([PROMPTS[1]], greedy(3), use_tqdm=False)[0]
    assert mine["token_ids"] == alone(PROMPTS[1], greedy(3))
    outs = list(first)
    while llm.has_unfinished():
        outs += llm.step()
    outs += llm.step()  # anything still held back is handed over
    assert {o.request_id for o in outs} == {streamed}
    assert [t for o in outs for t in o.new_token_ids] == llm.output(streamed)["token_ids"]
    assert [o.finished for o in outs].count(True) == 1 and outs[-1].finished
    assert "".join(o.text for o in outs) == llm.output(streamed)["text"]


# ---- defect 10: the last sampled token needs no slot -----------------------------------------------------


@pytest.mark.parametrize("chapter", ["ch03", "ch04"])
def test_a_request_that_fills_one_block_exactly_is_admitted(chapter):
    cfg = ModelConfig.from_folder(MODEL)
    memory = KVPool.bytes_per_block(cfg.num_layers, 16, cfg.num_kv_heads, cfg.head_dim, torch.float32)
    if chapter == "ch03":
        from chapters.ch03_paged_kv import LLM
    else:
        from chapters.ch04_continuous_batching import LLM
    llm = LLM(MODEL, block_size=16, kv_cache_memory=memory)  # one block of 16 tokens
    out = llm.generate([PROMPTS[1][:15]], greedy(2), use_tqdm=False)[0]  # 15 + 2 tokens, 16 of them stored
    assert len(out["token_ids"]) == 2
    with pytest.raises(ValueError, match="KV blocks"):
        llm.generate([PROMPTS[1][:15]], greedy(3), use_tqdm=False)


# ---- defect 7: chapter 3 gives its blocks back when a batch raises ---------------------------------------


def test_chapter3_gives_back_its_blocks_when_a_batch_raises(alone):
    from chapters.ch03_paged_kv import LLM

    llm = LLM(MODEL, block_size=4)
    fault = Fault(llm, calls={2})
    with pytest.raises(RuntimeError, match="injected"):
        llm.generate(PROMPTS[:4], greedy(), use_tqdm=False)
    fault.remove()
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    assert not llm.block_manager.hash_to_block  # the failed batch's blocks are not offered as cached
    outs = llm.generate(PROMPTS[:4], greedy(), use_tqdm=False)
    assert [o["token_ids"] for o in outs] == [alone(p, greedy()) for p in PROMPTS[:4]]


# ---- defect 12: fork shares blocks, and the first write into a shared partial block copies it ------------


def test_a_fork_shares_blocks_and_copies_the_partial_one_on_write(alone):
    llm = engine(block_size=4)
    params = greedy(12)
    parent = llm.add_request(PROMPTS[0], params)  # 10 prompt tokens
    for _ in range(2):
        llm.step()  # the prompt, then a decode: 12 tokens, 11 computed; block 2 holds positions 8-10 of 8-11
    seq = llm.requests[parent]
    child = llm.fork(parent)
    shared = llm.requests[child].block_table
    assert shared == seq.block_table and all(llm.block_manager.blocks[b].ref_count == 2 for b in shared)
    while llm.has_unfinished():
        llm.step()
    assert llm.output(child)["token_ids"] == llm.output(parent)["token_ids"] == alone(PROMPTS[0], params)
    assert llm.output(child)["text"] == llm.output(parent)["text"]
    llm.release(parent)
    llm.release(child)
    assert_idle(llm)


def test_copy_blocks_copies_every_layer():
    pool = KVPool(3, 4, 2, 1, 2, torch.float32)
    pool.k.normal_()
    pool.v.normal_()
    pool.copy_blocks([(1, 3), (0, 2)])
    assert torch.equal(pool.k[:, 3], pool.k[:, 1]) and torch.equal(pool.v[:, 2], pool.v[:, 0])


# ---- other threads ---------------------------------------------------------------------------------------


def test_other_threads_add_and_abort_while_one_steps(alone):
    llm = engine(blocks=40)
    stop, errors = threading.Event(), []
    added: dict[int, list[int]] = {}
    aborted: set[int] = set()

    def stepper():
        try:
            while not stop.is_set() or llm.has_unfinished():
                llm.step()
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    def client(seed):
        rng = random.Random(seed)
        try:
            for _ in range(6):
                prompt = rng.choice(PROMPTS)
                rid = llm.add_request(prompt, greedy(6))
                added[rid] = prompt
                if rng.random() < 0.4:
                    llm.abort(rid)
                    aborted.add(rid)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    runner = threading.Thread(target=stepper)
    runner.start()
    clients = [threading.Thread(target=client, args=(s,)) for s in range(3)]
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    stop.set()
    runner.join(timeout=120)
    assert not errors and not runner.is_alive()
    for rid, prompt in added.items():
        out = llm.output(rid)
        if rid in aborted:
            assert out["finish_reason"] in ("abort", "length")  # an abort may come after the end
        else:
            assert out["token_ids"] == alone(prompt, greedy(6))
        llm.release(rid)
    assert_idle(llm)


# ---- chapter 4 stays chapter 4 ---------------------------------------------------------------------------


def test_chapter4_pins_every_engine_option_a_later_chapter_adds():
    """A new LLMEngine option must be pinned by chapter 4 (to chapter 4's setting) or be listed here as one
    chapter 4 has; chapter 4's attention is one of its own backends, never a later chapter's."""
    from chapters.ch04_continuous_batching import LLM
    from nanovllm.engine.llm_engine import LLMEngine
    from nanovllm.layers.paged_attention import CDecodeAttention, TorchPagedAttention

    chapter4_options = {
        "self", "model", "dtype", "device", "max_model_len", "seed", "max_num_seqs", "max_num_batched_tokens",
        "block_size", "kv_cache_memory", "gpu_memory_utilization", "enable_prefix_caching",
        "enable_chunked_prefill", "attention_backend",
    }  # fmt: skip
    later = set(inspect.signature(LLMEngine.__init__).parameters) - chapter4_options
    assert later == set(LLM.pinned)
    assert LLM.attention_backends == ("torch", "c")
    for backend in ("auto", "torch"):
        assert type(engine(attention_backend=backend).runner.attention) in (TorchPagedAttention, CDecodeAttention)


def test_no_import_runs_from_layers_up_into_engine():
    for path in (ROOT / "nanovllm" / "layers").glob("*.py"):
        tree = ast.parse(Path(path).read_text())
        names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [n for n in names if n.startswith(("nanovllm.engine", "chapters"))], path.name


# ---- everything at once ----------------------------------------------------------------------------------


_lone_engines: dict[str, object] = {}


def lone_beams(prompt, params):
    """A beam search's sequences, run alone in a fresh engine of the current MODEL."""
    if MODEL not in _lone_engines:
        _lone_engines[MODEL] = engine()
    return [o["token_ids"] for o in _lone_engines[MODEL].beam_search([prompt], params)[0]["outputs"]]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_stress_random_requests_aborts_and_faults_lose_nothing(monkeypatch, alone, seed):
    """Random requests (greedy, seeded, n and best_of candidates, logit bias, allowed tokens, prompt logprobs) and
    beam searches in a tiny pool with a small
    token budget (chunks, preemption, parked beams giving their blocks back), random aborts, random exceptions in
    the forward pass and in the sampler. Every request and candidate ends exactly once; those that were neither
    aborted nor failed have their lone-run tokens (beams: their lone-run beams); every block comes back; and the
    prefix cache left behind gives every prompt its lone-run tokens again."""
    rng = random.Random(seed)
    llm = engine(blocks=14, max_num_batched_tokens=rng.choice([6, 16]), max_num_seqs=rng.choice([2, 4]))
    real_sample = engine_module.sample

    def flaky_sample(logits, batch):
        if rng.random() < 0.08:
            raise RuntimeError("injected sampling failure")
        return real_sample(logits, batch)

    monkeypatch.setattr(engine_module, "sample", flaky_sample)
    forward_faults = Fault(llm, calls=set(rng.sample(range(1, 400), 25)))
    kinds = [greedy(rng.randint(1, 12)) for _ in range(3)]
    kinds += [SamplingParams(temperature=0.8, top_k=20, max_tokens=8, seed=s, ignore_eos=True) for s in (1, 2)]
    kinds += [SamplingParams(temperature=0, max_tokens=5, n=2, ignore_eos=True)]
    kinds += [SamplingParams(temperature=0.8, max_tokens=5, n=2, best_of=3, seed=3, ignore_eos=True)]
    kinds += [BeamSearchParams(2, 5, ignore_eos=True), BeamSearchParams(3, 4)]
    kinds += [SamplingParams(temperature=0, max_tokens=6, logit_bias={5: 4.0, 17: -100.0}, ignore_eos=True)]
    kinds += [SamplingParams(temperature=0.7, max_tokens=6, allowed_token_ids=list(range(3, 60)), seed=4)]
    kinds += [SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=2, ignore_eos=True)]
    requests, searches, finished, aborted, step = {}, [], [], set(), 0
    beam_ids: set[int] = set()  # engine requests that hold beams: their outputs are the searches' business
    while len(requests) + len(searches) < 24 or llm.has_unfinished() or not all(s.done for s, _, _ in searches):
        if len(requests) + len(searches) < 24 and rng.random() < 0.5:
            params = rng.choice(kinds)
            prompt = rng.choice(PROMPTS)
            if isinstance(params, BeamSearchParams):
                searches.append((BeamSearch(llm, prompt, params), prompt, params))
            else:
                requests[llm.add_request(prompt, params)] = (prompt, params)
        if requests and rng.random() < 0.05:
            rid = rng.choice(list(requests))
            if not llm.requests[rid].is_finished:
                llm.abort(rid)
                aborted.add(rid)
        if searches and rng.random() < 0.02:
            rng.choice(searches)[0].abort()
        update_searches([s for s, _, _ in searches])
        beam_ids |= {rid for s, _, _ in searches for rid in s.request_ids}
        try:
            finished += [o.request_id for o in llm.step() if o.finished and o.request_id not in beam_ids]
        except RuntimeError as e:
            assert "injected" in str(e)
        step += 1
        assert step < 3000
    forward_faults.remove()
    monkeypatch.setattr(engine_module, "sample", real_sample)
    members = {rid: llm.groups[rid] for rid in requests}  # a request and its candidates
    assert len(finished) == len(set(finished))  # none ends twice
    assert {m for rid in requests if rid not in aborted for m in members[rid]} <= set(finished)
    errors = 0
    for rid, (prompt, params) in requests.items():
        outs = [llm.output(m) for m in members[rid]]
        if rid in aborted:
            assert any(o["finish_reason"] == "abort" for o in outs)
        elif any(o["finish_reason"] == "error" for o in outs):
            errors += 1
            assert all("injected sampling failure" in o["error"] for o in outs if o["finish_reason"] == "error")
        else:
            assert len(outs) == params.candidates
            assert llm.result(rid)["token_ids"] == alone(prompt, params), (rid, params)
        llm.release(rid)
    for search, prompt, params in searches:
        result = search.result()
        if search.finish_reason == "error":
            errors += 1
            assert "injected sampling failure" in result["error"]
        elif search.finish_reason is None:  # not aborted
            assert [o["token_ids"] for o in result["outputs"]] == lone_beams(prompt, params), params
    assert any(s.finish_reason is None for s, _, _ in searches) and llm.stats["preemptions"] > 0
    assert_idle(llm)
    for b, block in enumerate(llm.block_manager.blocks):  # every cached block is findable under its own hash
        if block.hash != -1 and llm.block_manager.hash_to_block.get(block.hash) == b:
            assert block.token_ids
    for prompt in PROMPTS:  # served from the prefix cache the stress test left behind
        assert llm.generate([prompt], greedy(), use_tqdm=False)[0]["token_ids"] == alone(prompt, greedy())


@pytest.mark.slow
def test_stress_with_a_sliding_window_model_loses_nothing(monkeypatch):
    """The stress test above on Gemma 2: a window of 5 tokens (not a multiple of the blocks of 4) on alternate
    layers, soft caps, its own query scale; chunks, preemption and the prefix cache read windows that cross blocks.
    Lone runs of the same model are the reference."""
    monkeypatch.setattr(f"{__name__}.MODEL", str(TINY_MODELS / "tiny-gemma2"))
    lone, cache = engine(), {}

    def alone(prompt, params):
        key = (tuple(prompt), repr(params))
        if key not in cache:
            cache[key] = lone.generate([prompt], params, use_tqdm=False)[0]["token_ids"]
        return cache[key]

    assert lone.model.model.layers[0].self_attn.spec.window == 5
    test_stress_random_requests_aborts_and_faults_lose_nothing(monkeypatch=monkeypatch, alone=alone, seed=0)


# ---- a 16-bit KV cache -----------------------------------------------------------------------------------


def test_a_bfloat16_kv_cache_holds_twice_the_blocks_and_keeps_greedy_text(stories260k):
    """kv_cache_dtype='bfloat16': the same memory holds twice the blocks, and greedy decoding of a real model mostly
    keeps its tokens (K and V rounded to 8 bits of mantissa move the scores a little; a near tie may flip)."""
    from nanovllm import LLM

    prompts = ["Once upon a time", "Lily wanted to", "The big dog", "One day, a little boy named Tim"]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    budget = 1 << 20
    full = LLM(str(stories260k), kv_cache_memory=budget)
    half = LLM(str(stories260k), kv_cache_memory=budget, kv_cache_dtype="bfloat16")
    assert half.pool.k.dtype == torch.bfloat16 and half.pool.num_blocks == 2 * full.pool.num_blocks
    want = [o["token_ids"] for o in full.generate(prompts, params, use_tqdm=False)]
    got = [o["token_ids"] for o in half.generate(prompts, params, use_tqdm=False)]
    same = sum(a == b for w, g in zip(want, got) for a, b in zip(w, g))
    assert same >= 0.9 * sum(len(w) for w in want)
    assert sum(w[:8] == g[:8] for w, g in zip(want, got)) >= 3  # the first tokens, before any drift


@pytest.mark.parametrize("backend", ["torch", "c"])
def test_a_bfloat16_kv_cache_reads_the_same_in_one_chunk_or_many(backend):
    """A prompt's first chunk attends to its own K/V as the pool holds them (rounded to bfloat16), as later chunks
    and decodes do: the prompt's logprobs are then the same, to float32 rounding, whether it is prefilled in one
    chunk or in 16-token chunks. (Attending to the unrounded K/V moved them by ~1e-2, and greedy text followed the
    schedule.)"""
    from nanovllm import LLM

    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, 384) for _ in range(100)] for _ in range(4)]
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    runs = [
        LLM(MODEL, kv_cache_dtype="bfloat16", attention_backend=backend, max_num_batched_tokens=chunk).generate(
            prompts, params, use_tqdm=False
        )
        for chunk in (512, 16)
    ]
    for whole, chunked in zip(*runs):
        moved = sorted(abs(a["logprob"] - b["logprob"]) for a, b in zip(whole["prompt_logprobs"][1:],
                                                                        chunked["prompt_logprobs"][1:]))  # fmt: skip
        assert moved[len(moved) // 2] < 1e-4, moved[len(moved) // 2]  # the median: a rare bfloat16 tie may flip


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_a_bfloat16_model_runs_on_the_cpu_kernels(quantization):
    """dtype='bfloat16' on the CPU: the C attention kernel widens q to float32 and narrows its output, and the decode
    kernels (float32 only) stand aside, also when every linear layer is quantized (once, both raised on the first
    decode step). Greedy tokens start as the float32 engine's."""
    from nanovllm import LLM

    prompts = ["Once upon a time", "The cat sat", "Hello there", "A big red dog"]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    half = LLM(MODEL, dtype="bfloat16", quantization=quantization)
    assert half.runner.attention.name == "c"
    got = [o["token_ids"] for o in half.generate(prompts, params, use_tqdm=False)]
    want = [o["token_ids"] for o in LLM(MODEL, quantization=quantization).generate(prompts, params, use_tqdm=False)]
    assert all(len(g) == 8 for g in got) and sum(g[0] == w[0] for g, w in zip(got, want)) >= 3


def test_kv_cache_dtype_names_its_choices():
    from nanovllm import LLM
    from nanovllm.engine.tensor_parallel import kv_cache_dtype

    with pytest.raises(ValueError, match="'auto' or 'bfloat16'"):
        LLM(MODEL, kv_cache_dtype="int8")
    with pytest.raises(TypeError, match="kv_cache_dtype"):
        LLM(MODEL, kv_cache_dtype=torch.bfloat16)
    assert kv_cache_dtype("auto", torch.float32, "cpu") == torch.float32
    assert kv_cache_dtype("bfloat16", torch.float32, "cpu") == torch.bfloat16
    assert kv_cache_dtype("bfloat16", torch.bfloat16, "cuda") == torch.bfloat16
    with pytest.raises(ValueError, match="needs dtype='bfloat16'"):
        kv_cache_dtype("bfloat16", torch.float16, "cuda")
