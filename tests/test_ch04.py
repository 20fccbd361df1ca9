"""Chapter 4 tests: the scheduler, preemption and the sampling filters; then the engine, step by step.

Run against your own code with:  pytest --impl=exercises -m ch04 -k task1
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FAMILIES, TINY_MODELS
from nanovllm.config import ModelConfig
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.kv_cache import KVPool
from nanovllm.engine.sequence import Sequence, Status
from nanovllm.kernels.cpu import c_kernels_unavailable
from nanovllm.sampling_params import SamplingParams

CHAPTER = "ch04"
pytestmark = pytest.mark.ch04


def engine(family="tiny-llama", blocks=None, block_size=4, **options):
    from chapters.ch04_continuous_batching import LLM

    if blocks is not None:
        cfg = ModelConfig.from_folder(TINY_MODELS / family)
        options["kv_cache_memory"] = blocks * KVPool.bytes_per_block(
            cfg.num_layers, block_size, cfg.num_kv_heads, cfg.head_dim, torch.float32
        )
    return LLM(str(TINY_MODELS / family), block_size=block_size, **options)


# ---- task 1: schedule ------------------------------------------------------------------------------------


def test_task1_schedule_chunks_prompts_and_respects_both_budgets(impl):
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = impl.Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=8)
    a, b, c = Sequence(list(range(10))), Sequence(list(range(20, 25))), Sequence(list(range(30, 33)))
    for s in (a, b, c):
        sched.add(s)
    first = sched.schedule()
    assert first.seqs == [a] and first.num_tokens == [8]  # a's prompt is chunked: the budget is 8 tokens
    assert a.num_computed_tokens == 0  # nothing counts as computed before the forward pass has run
    sched.postprocess(first)  # the forward pass ran: now it does
    assert a.num_computed_tokens == 8 and sched.running == [a] and list(sched.waiting) == [b, c]
    second = sched.schedule()
    assert second.seqs == [a, b] and second.num_tokens == [2, 5]  # b's whole 5-token prompt fits the budget
    assert sum(second.num_tokens) <= 8 and sched.running == [a, b] and list(sched.waiting) == [c]
    sched.postprocess(second)
    a.token_ids.append(7)  # the engine samples a's first token
    b.token_ids.append(7)
    third = sched.schedule()  # two decodes; c waits: max_num_seqs is 2
    assert third.seqs == [a, b] and third.num_tokens == [1, 1] and list(sched.waiting) == [c]


def test_task1_schedule_without_chunking_waits_for_a_whole_prompt(impl):
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = impl.Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=8, enable_chunked_prefill=False)
    short, long = Sequence([1, 2, 3]), Sequence(list(range(12)))
    sched.add(short)
    sched.add(long)
    step = sched.schedule()
    assert step.seqs == [short] and list(sched.waiting) == [long]


def test_task1_schedule_counts_prefix_cache_hits_as_computed(impl):
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = impl.Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    first = Sequence(list(range(13)))
    sched.add(first)
    sched.postprocess(sched.schedule())
    again = Sequence(list(range(13)))
    sched.add(again)
    step = sched.schedule()
    assert step.seqs[-1] is again and step.num_tokens[-1] == 1 and again.num_cached_tokens == 12


# ---- task 2: preempt -------------------------------------------------------------------------------------


def test_task2_preempt_frees_blocks_and_requeues_at_the_front(impl):
    bm = BlockManager(num_blocks=16, block_size=4)
    sched = impl.Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    a, b, c = Sequence(list(range(9))), Sequence(list(range(5))), Sequence([1, 2])
    for s in (a, b, c):
        sched.add(s)
    sched.schedule()
    sched.waiting.append(d := Sequence([3, 4]))
    sched.running.remove(c)  # pretend c was never admitted, so b is the newest running one
    bm.free(c)
    sched.preempt(b)
    assert sched.running == [a] and list(sched.waiting) == [b, d]
    assert b.status is Status.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert b.token_ids == list(range(5)) and bm.num_free_blocks == 16 - len(a.block_table)


def test_task2_out_of_blocks_preempts_the_newest_and_recomputes_it(impl):
    bm = BlockManager(num_blocks=4, block_size=2)
    sched = impl.Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    old, new = Sequence([1, 2, 3]), Sequence([4, 5, 6])
    sched.add(old)
    sched.add(new)
    sched.schedule()  # both admitted: 2 blocks each, the pool is full
    old.token_ids += [7, 8]  # old grows into a third block (as if two steps ran)
    old.num_computed_tokens = 4
    step = sched.schedule()
    assert step.preempted == [new] and step.seqs == [old] and list(sched.waiting) == [new]


# ---- tasks 3-5: the sampling filters, and the distributions they make ------------------------------------


def reference_distribution(logits, temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0):
    """The truncated, renormalised softmax, written independently with numpy."""
    p = np.exp((logits - logits.max()) / temperature)
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.ones_like(p, dtype=bool)
    if top_k > 0:
        keep[order[top_k:]] = False
    q = np.where(keep, p, 0)
    q /= q.sum()
    mass_before = 0.0
    for i in order:  # nucleus over what top-k kept: keep while the mass before is below top_p
        if mass_before >= top_p:
            keep[i] = False
        mass_before += q[i]
    q = np.where(keep, p, 0)
    q /= q.sum()
    keep &= q >= min_p * q.max()
    q = np.where(keep, p, 0)
    return q / q.sum()


@pytest.fixture(scope="module")
def model_logits():
    """Real next-token logits of a tiny model, for a fixed context."""
    from chapters.ch01_naive.llm import no_cache_attention
    from nanovllm.utils.loader import load_model

    m = load_model(TINY_MODELS / "tiny-qwen3").model
    ids = torch.tensor([[1, 60, 61, 62, 63]])
    with torch.no_grad():
        return m.compute_logits(m(ids, torch.arange(5)[None], no_cache_attention)[0, -1]) * 1.5


def test_task3_top_k(impl):
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [1.0, 3.0, 2.0, 0.0]])
    out = impl.apply_top_k(logits, torch.tensor([2, -1]))
    assert torch.isinf(out[0, [0, 3]]).all() and torch.equal(out[0, [1, 2]], logits[0, [1, 2]])
    assert torch.equal(out[1], logits[1])


def test_task4_top_p_keeps_the_token_that_crosses_the_threshold(impl):
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = impl.apply_top_p(probs.log(), torch.tensor([0.6]))
    assert torch.isfinite(out[0, :2]).all() and torch.isinf(out[0, 2:]).all()  # 0.5 < 0.6, so 0.3 is kept
    out = impl.apply_top_p(probs.log(), torch.tensor([0.5]))
    assert torch.isfinite(out[0, 0]) and torch.isinf(out[0, 1:]).all()
    assert torch.isfinite(impl.apply_top_p(probs.log(), torch.tensor([1.0]))).all()


def test_task5_min_p(impl):
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = impl.apply_min_p(probs.log(), torch.tensor([0.35]))  # threshold 0.175
    assert torch.isfinite(out[0, :2]).all() and torch.isinf(out[0, 2:]).all()


@pytest.mark.parametrize(
    "options",
    [
        dict(temperature=0.7),
        dict(temperature=1.0, top_k=5),
        dict(temperature=1.0, top_p=0.7),
        dict(temperature=1.3, top_p=0.9, top_k=20),
        dict(temperature=1.0, min_p=0.1),
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_tasks3to5_draws_follow_the_truncated_softmax(impl, model_logits, options):
    from nanovllm.layers.sampler import SamplingBatch, sample

    n = 4000
    params = SamplingParams(**options)
    generators = [torch.Generator().manual_seed(i) for i in range(n)]
    batch = SamplingBatch.build([params] * n, [[1]] * n, [1] * n, [2], len(model_logits), generators)
    draws = sample(model_logits.expand(n, -1), batch)
    observed = np.bincount(draws, minlength=len(model_logits)) / n
    expected = reference_distribution(model_logits.double().numpy(), **options)
    assert observed[expected == 0].sum() == 0, "a filtered-out token was drawn"
    statistic, dof = chi_square(observed * n, expected * n)
    assert statistic < chi_square_critical(dof), (statistic, dof)


def chi_square(counts, expected_counts, min_expected=5.0):
    """Pearson's statistic, pooling the tokens expected fewer than 5 times into one bin."""
    big = expected_counts >= min_expected
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected_counts[big], expected_counts[~big].sum())
    used = exp > 0
    return float((((obs - exp) ** 2)[used] / exp[used]).sum()), int(used.sum()) - 1


def chi_square_critical(dof, z=3.72):
    """The chi-square quantile at p = 1e-4 (z = 3.72), by the Wilson-Hilferty approximation."""
    return dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3


def test_top_p_boundary_token_carries_real_mass(model_logits):
    """The top-p case above bites: an off-by-one at the boundary fails the same chi-square test."""
    logits = model_logits.double().numpy()
    right = reference_distribution(logits, top_p=0.7)
    order = np.argsort(-right)
    crossing = order[(right > 0).sum() - 1]  # the kept token that crosses the threshold
    wrong = right.copy()
    wrong[crossing] = 0
    wrong /= wrong.sum()
    statistic, dof = chi_square(wrong * 4000, right * 4000)
    assert statistic > 3 * chi_square_critical(dof)


# ---- the engine ------------------------------------------------------------------------------------------


def run_with_late_arrivals(llm, data) -> dict:
    """Each oracle case twice, a new request every third step; returns {request id: (tokens, expected)}."""
    cases = data["cases"] * 2
    greedy = SamplingParams(temperature=0.0, max_tokens=data["max_new_tokens"])
    ids = {}
    for step in range(400):
        if step % 3 == 0 and len(ids) < len(cases):  # a new request every third step
            ids[llm.add_request(cases[len(ids)]["prompt"], greedy)] = cases[len(ids)]["greedy"]
        llm.step()
        if len(ids) == len(cases) and not llm.has_unfinished():
            break
    return {i: (llm.output(i)["token_ids"], expected) for i, expected in ids.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_all_tasks_engine_matches_transformers_with_chunks_preemption_and_late_arrivals(impl, oracle, family):
    llm = engine(family, blocks=14, max_num_batched_tokens=5)  # tiny pool, tiny token budget
    results = run_with_late_arrivals(llm, oracle["models"][family])
    assert {i: got for i, (got, _) in results.items()} == {i: want for i, (_, want) in results.items()}
    assert llm.stats["preemptions"] > 0
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    if c_kernels_unavailable() is None:  # decodes went through the C kernel
        assert llm.runner.attention.name == "c"


@pytest.mark.parametrize("family", FAMILIES)
def test_pytorch_attention_path_matches_transformers_too(oracle, family):
    """The same run on the PyTorch path, the one a machine without a C compiler takes."""
    llm = engine(family, blocks=14, max_num_batched_tokens=5, attention_backend="torch")
    assert llm.runner.attention.name == "torch"
    results = run_with_late_arrivals(llm, oracle["models"][family])
    assert {i: got for i, (got, _) in results.items()} == {i: want for i, (_, want) in results.items()}
    assert llm.stats["preemptions"] > 0


def test_engine_matches_chapter3_on_a_batch():
    from chapters.ch03_paged_kv import LLM as Chapter3

    rng = random.Random(1)
    prompts = [[1] + [rng.randint(3, 380) for _ in range(rng.randint(2, 40))] for _ in range(10)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(1, 30), ignore_eos=True) for _ in prompts]
    ours = engine("tiny-qwen2", max_num_batched_tokens=32).generate(prompts, params, use_tqdm=False)
    theirs = Chapter3(str(TINY_MODELS / "tiny-qwen2")).generate(prompts, params, use_tqdm=False)
    assert [o["token_ids"] for o in ours] == [o["token_ids"] for o in theirs]


def test_step_streams_tokens_and_abort_frees_blocks_at_once():
    llm = engine()
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    keep, drop = llm.add_request("Once upon a time", params), llm.add_request("The cat sat", params)
    alone = engine().generate(["Once upon a time"], params, use_tqdm=False)[0]["token_ids"]
    streamed = []
    for _ in range(5):
        for out in llm.step():
            if out.request_id == keep:
                streamed += out.new_token_ids
    before = llm.block_manager.num_free_blocks
    held = len(llm.requests[drop].block_table)
    llm.abort(drop)
    assert llm.block_manager.num_free_blocks == before + held and llm.output(drop)["finish_reason"] == "abort"
    while llm.has_unfinished():
        for out in llm.step():
            assert out.request_id == keep
            streamed += out.new_token_ids
    assert streamed == alone == llm.output(keep)["token_ids"]
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def stream(llm, requests: dict) -> dict:
    """Run to the end; each request's StepOutput.text pieces, in order."""
    pieces = {i: [] for i in requests}
    while llm.has_unfinished():
        for out in llm.step():
            pieces[out.request_id].append(out.text)
    return pieces


def test_streamed_text_adds_up_to_the_output_and_never_shows_a_stop_string():
    llm = engine()
    free = llm.generate(["Once upon"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    stop = free[0]["text"][8:11]
    params = {
        "plain": SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        "stop": SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]),
        "kept": SamplingParams(
            temperature=0, max_tokens=20, ignore_eos=True, stop=[stop], include_stop_str_in_output=True
        ),
        "sampled": SamplingParams(temperature=1.0, max_tokens=30, seed=3),
    }
    ids = {llm.add_request("Once upon", p): name for name, p in params.items()}
    pieces = stream(llm, ids)
    for request_id, name in ids.items():
        text = llm.output(request_id)["text"]
        assert "".join(pieces[request_id]) == text, name
    # "stop": text that may be a stop string's start is held back, so the stop string is never sent
    stopped = next(i for i, n in ids.items() if n == "stop")
    assert all(stop not in "".join(pieces[stopped][: k + 1]) for k in range(len(pieces[stopped])))
    assert stop in "".join(pieces[next(i for i, n in ids.items() if n == "kept")])
    assert llm.output(next(i for i, n in ids.items() if n == "stop"))["finish_reason"] == "stop"


def test_stop_strings_cost_a_short_decode_per_token_not_the_whole_text():
    from nanovllm.utils.tokenizer import incremental_text

    llm = engine()
    tok = llm.tokenizer
    lengths = []
    real_decode = tok.decode
    tok.decode = lambda ids: lengths.append(len(ids)) or real_decode(ids)
    prompt = tok.encode("Once upon a time")
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, stop=["never in a story: 0xFFFF"])
    [request] = stream(llm, {llm.add_request(prompt, params): 0}).items()
    tok.decode = real_decode
    out = llm.output(request[0])
    assert len(out["token_ids"]) == 60 and "".join(request[1]) == out["text"]
    assert out["text"] == incremental_text(tok, prompt, out["token_ids"])
    # each step decodes a window of a few tokens; decoding the whole text each step would read > 1800 tokens
    assert max(lengths[:-2]) <= len(prompt) + 12 and sum(lengths) < 20 * (len(prompt) + 60)


def test_seeded_requests_give_the_same_tokens_whatever_shares_the_batch():
    from chapters.ch01_naive import LLM as Chapter1

    seeded = SamplingParams(temperature=0.9, max_tokens=12, seed=5)
    others = [SamplingParams(temperature=1.0, top_k=10, max_tokens=8, seed=s) for s in range(4)]
    alone = engine().generate(["The cat"], seeded, use_tqdm=False)[0]["token_ids"]
    crowded = engine().generate(["Once", "The cat", "A", "KV", "B"], [others[0], seeded, *others[1:]], use_tqdm=False)
    assert crowded[1]["token_ids"] == alone
    # temperature alone draws exactly as chapter 1 does
    assert (
        Chapter1(str(TINY_MODELS / "tiny-llama")).generate(["The cat"], seeded, use_tqdm=False)[0]["token_ids"] == alone
    )


def test_stop_strings_stop_ids_and_min_tokens():
    llm = engine()
    free = llm.generate(["Once upon"], SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0]
    stop = free["text"][6:9]
    cut = llm.generate(["Once upon"], SamplingParams(temperature=0, max_tokens=20, stop=[stop]), use_tqdm=False)[0]
    assert cut["finish_reason"] == "stop" and cut["text"] == free["text"][: free["text"].index(stop)]
    kept = llm.generate(
        ["Once upon"],
        SamplingParams(temperature=0, max_tokens=20, stop=stop, include_stop_str_in_output=True),
        use_tqdm=False,
    )[0]
    assert kept["text"] == cut["text"] + stop
    third = free["token_ids"][2]
    by_id = llm.generate(
        ["Once upon"], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[third]), use_tqdm=False
    )[0]
    assert by_id["token_ids"] == free["token_ids"][: free["token_ids"].index(third) + 1]
    late = llm.generate(
        ["Once upon"],
        SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[third], min_tokens=10),
        use_tqdm=False,
    )[0]
    assert len(late["token_ids"]) >= 10


def test_a_stop_string_completed_by_the_last_allowed_token_still_stops():
    llm = engine()
    free = llm.generate(["Once upon"], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    text = free["text"]
    tail = next(text[-n:] for n in range(1, len(text) + 1) if text.index(text[-n:]) == len(text) - n)
    short = SamplingParams(temperature=0, max_tokens=len(free["token_ids"]), stop=[tail])
    cut = llm.generate(["Once upon"], short, use_tqdm=False)[0]
    assert cut["finish_reason"] == "stop" and cut["text"] == text[: len(text) - len(tail)]


def test_stop_strings_wait_for_min_tokens():
    llm = engine()
    free = llm.generate(["Once upon"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    text = free[0]["text"]
    first = next(text[:n] for n in range(1, len(text)) if text.count(text[:n]) == 1)  # occurs once, at the start
    late = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[first], min_tokens=5)
    out = llm.generate(["Once upon"], late, use_tqdm=False)[0]  # the string came before min_tokens: no stop
    assert out["token_ids"] == free[0]["token_ids"] and out["finish_reason"] == "length"


def test_one_bad_request_in_generate_queues_none_of_them():
    llm = engine(blocks=8)
    fine = SamplingParams(max_tokens=4)
    with pytest.raises(ValueError, match="KV blocks"):
        llm.generate(["Once upon", "The cat"], [fine, SamplingParams(max_tokens=500)], use_tqdm=False)
    with pytest.raises(ValueError, match="stop_token_ids"):
        llm.generate(["Once upon", "The cat"], [fine, SamplingParams(stop_token_ids=[10**6])], use_tqdm=False)
    assert not llm.has_unfinished() and not llm.requests


def test_a_request_may_fill_the_whole_pool_when_alone():
    llm = engine(blocks=128, block_size=2)  # the admission watermark (1 block) must not lock it out
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompt = [3 + i % 200 for i in range(246)]  # 246 + 10 tokens: the whole context, all 128 blocks
    rid = llm.add_request(prompt, params)
    for _ in range(100):
        if not llm.has_unfinished():
            break
        llm.step()
    out = llm.output(rid)
    assert out["finish_reason"] == "length" and len(out["token_ids"]) == 10


def test_release_forgets_a_request_and_frees_its_blocks():
    llm = engine()
    done = llm.add_request("Once upon", SamplingParams(max_tokens=3))
    while llm.has_unfinished():
        llm.step()
    assert len(llm.output(done)["token_ids"]) == 3 == len(llm.output(done)["token_ids"])  # read as often as needed
    running = llm.add_request("The cat", SamplingParams(max_tokens=30))
    llm.step()
    llm.release(done)
    llm.release(running)  # still running: aborted, its blocks back at once
    assert not llm.requests and not llm.has_unfinished()
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    with pytest.raises(KeyError, match="released"):
        llm.output(done)


def test_repetition_penalty_matches_transformers():
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(TINY_MODELS / "tiny-llama", dtype=torch.float32).eval()
    ids = torch.tensor([[1, 50, 60, 50, 60]])
    with torch.no_grad():
        expected = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=16,
            repetition_penalty=1.3,
            pad_token_id=0,
        )[0, 5:].tolist()
    ours = engine().generate(
        [ids[0].tolist()], SamplingParams(temperature=0, max_tokens=16, repetition_penalty=1.3), use_tqdm=False
    )[0]["token_ids"]
    assert ours == expected[: len(ours)] and len(ours) >= 1


def test_presence_and_frequency_penalties_follow_the_openai_formula():
    from nanovllm.layers.sampler import SamplingBatch, apply_penalties

    logits = torch.zeros(1, 8)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    batch = SamplingBatch.build([params], [[1, 2, 3, 3, 3, 5]], [1], [2], 8, [None])  # output: 2, 3, 3, 3, 5
    out = apply_penalties(logits.clone(), batch)[0]
    counts = {2: 1, 3: 3, 5: 1}
    expected = torch.tensor([-(0.25 * counts.get(t, 0) + 0.5 * (t in counts)) for t in range(8)])
    torch.testing.assert_close(out, expected)


# ---- property test of the scheduler with the real engine -------------------------------------------------

_alone: dict[tuple, list[int]] = {}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 12), st.integers(0, 4)), min_size=1, max_size=6),
    budget=st.integers(1, 24),
    max_seqs=st.integers(1, 4),
    blocks=st.integers(12, 40),
)
def test_scheduler_property_every_request_finishes_once_with_its_alone_tokens(lengths, budget, max_seqs, blocks):
    llm = engine(blocks=blocks, max_num_batched_tokens=budget, max_num_seqs=max_seqs)
    seen_budgets = []
    schedule = llm.scheduler.schedule

    def recording_schedule():
        batch = schedule()
        seen_budgets.append((sum(batch.num_tokens), len(batch.seqs)))
        return batch

    llm.scheduler.schedule = recording_schedule
    requests = [([1] + [(7 * i + j) % 380 + 3 for j in range(n)], m, at) for i, (n, m, at) in enumerate(lengths)]
    ids, finished, step = {}, [], 0
    while len(ids) < len(requests) or llm.has_unfinished():
        for i, (prompt, m, at) in enumerate(requests):
            if at == step:
                ids[llm.add_request(prompt, SamplingParams(temperature=0, max_tokens=m, ignore_eos=True))] = i
        finished += [o.request_id for o in llm.step() if o.finished]
        step += 1
        assert step < 2000
    assert sorted(finished) == sorted(ids)  # every request finished exactly once
    assert all(tokens <= budget and n <= max_seqs for tokens, n in seen_budgets)
    for rid, i in ids.items():
        prompt, m, _ = requests[i]
        key = (tuple(prompt), m)
        if key not in _alone:
            _alone[key] = engine().generate(
                [prompt], SamplingParams(temperature=0, max_tokens=m, ignore_eos=True), use_tqdm=False
            )[0]["token_ids"]
        assert llm.output(rid)["token_ids"] == _alone[key]
    assert llm.block_manager.num_free_blocks == blocks
