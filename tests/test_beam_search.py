"""Beam search (vLLM's semantics) against transformers, on every tiny family and stories260K, beam widths 1-8.

Where the two libraries agree, ours is checked against `generate(num_beams=k)` itself; where they differ (EOS),
against a short reference of each library's rules over transformers' logits, and that reference is itself checked
against `generate`, so the differences are measured, not assumed (the table is in book/decoding.md):

- candidates per round: vLLM each beam's 2k likeliest tokens; transformers the 2k likeliest (beam, token) pairs
  of all beams (k more per EOS id past the first).
- a candidate ending in EOS: vLLM always completes it; transformers only if it is among the round's k likeliest.
- completed beams kept: vLLM all (the k best matter); transformers the k best.
- the score's length: vLLM prompt + generated, without the EOS; transformers generated, with the EOS.
- stopping: vLLM after max_tokens rounds; transformers by `early_stopping` (True: once k are complete; False: a
  heuristic; "never": once no live beam can win, the same answer as running on, so "never" is the one compared).

So with EOS ignored (`ignore_eos=True`, and no `eos_token_id` in transformers) every beam has the same length and
the two agree token for token, whatever `length_penalty` and `early_stopping` are; with EOS they can differ.
"""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, TINY_MODELS, shared_path
from nanovllm.engine.beam_search import MAX_BEAM_WIDTH, BeamSearch, BeamSearchParams, update_searches
from nanovllm.sampling_params import SamplingParams

pytestmark = pytest.mark.ch04
CHAPTER = "ch04"  # tasks 6 and 7 of chapter 4 are checked here: pytest --impl=exercises -m ch04 -k "task6 or task7"
WIDTHS = [1, 2, 4, 8]
PROMPT = [1, 17, 45, 88, 203, 9, 311, 42, 7, 150]  # 10 tokens: with blocks of 4, the last block is shared partly full
MODELS = [*FAMILIES, "stories260K"]
_cache: dict[str, tuple] = {}


def setup(name: str):
    """(our engine, transformers' model, a prompt, max_tokens) for a tiny family or stories260K, built once."""
    if name not in _cache:
        from transformers import AutoModelForCausalLM, LlamaConfig

        from nanovllm import LLM

        if name == "stories260K":
            from nanovllm.utils.llama2c import read_llama2c

            path = shared_path("models/stories260K")
            config, state = read_llama2c(path / "stories260K.bin")
            hf = AutoModelForCausalLM.from_config(LlamaConfig(**config)).eval()
            hf.load_state_dict(state, strict=False)
            llm = LLM(str(path), block_size=4)
            # the end of a story: EOS comes among the likely tokens (a completed beam at width 8)
            prompt, max_tokens = llm.tokenizer.encode("Lily and Tom played all day. They were happy. The end."), 40
        else:
            path = TINY_MODELS / name
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            llm, prompt, max_tokens = LLM(str(path), block_size=4), PROMPT, 12
        _cache[name] = (llm, hf, prompt, max_tokens)
    return _cache[name]


def model_setup(name: str):
    if name == "stories260K":
        shared_path("models/stories260K")  # skipped (or failed under CI) without ../shared
    return setup(name)


def idle(llm) -> bool:
    return not llm.requests and llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def hf_beam_search(hf, prompt, k, max_tokens, eos, length_penalty, early_stopping="never"):
    """transformers' answer: k (generated tokens, score) pairs, best first (eos: a list of ids, or None)."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        num_beams=k,
        num_return_sequences=k,
        do_sample=False,
        max_new_tokens=max_tokens,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        eos_token_id=eos,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_scores=True,
    )
    ids = torch.tensor([prompt])
    hf.generation_config.eos_token_id = eos  # else generate falls back on the model's EOS when eos is None
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    scores = out.sequences_scores.tolist() if k > 1 else [None] * k
    result = []
    for row, score in zip(out.sequences.tolist(), scores):
        tokens = row[len(prompt) :]
        if eos is not None and (ends := [i for i, t in enumerate(tokens) if t in eos]):
            tokens = tokens[: ends[0] + 1]  # after its EOS, a completed beam is padding
        result.append((tokens, score))
    return result


def reference_beam_search(hf, prompt, k, max_tokens, eos, length_penalty, rules):
    """Beam search over transformers' logits by one library's rules ("vllm" or "transformers", see the table);
    the two differ only where the table says (eos: a list of ids). Returns k (tokens, cumulative logprob, score),
    best first."""
    live, done = [([], 0.0)], []  # (generated tokens, cumulative logprob)

    def score(tokens, cum, ended):
        length = len(prompt) + len(tokens) - ended if rules == "vllm" else len(tokens)
        return cum / length**length_penalty

    for step in range(max_tokens):
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + t for t, _ in live])).logits[:, -1].float()  # (B, V)
        logprobs = logits.log_softmax(-1)
        if rules == "vllm":
            top = [logprobs[i].topk(2 * k) for i in range(len(live))]
            cands = [(live[i][0] + [t], live[i][1] + v) for i in range(len(live)) for v, t in zip(*top[i])]
        else:
            keep = max(2, 1 + len(eos)) * k  # transformers widens the round by one k per EOS id
            values, flat = (logprobs + torch.tensor([c for _, c in live])[:, None]).flatten().topk(keep)
            vocab = logprobs.shape[-1]
            cands = [(live[int(f) // vocab][0] + [int(f) % vocab], float(v)) for v, f in zip(values, flat)]
        cands = [(tokens[:-1] + [int(tokens[-1])], float(cum)) for tokens, cum in cands]
        last = step == max_tokens - 1
        ended = [tokens[-1] in eos for tokens, _ in cands]
        if rules == "vllm":
            done += [(t, c, True) for (t, c), e in zip(cands, ended) if e]
        else:  # a candidate that stops (EOS, or the last round) completes only among the round's k likeliest
            done += [(t, c, e) for rank, ((t, c), e) in enumerate(zip(cands, ended)) if (e or last) and rank < k]
        live = sorted([c for c, e in zip(cands, ended) if not e], key=lambda c: -score(c[0], c[1], False))[:k]
        if last and rules == "vllm":
            done += [(t, c, False) for t, c in live]
        if not live:
            break
    done.sort(key=lambda d: -score(*d))
    return [(t, c, score(t, c, e)) for t, c, e in done[:k]]


# ---- against transformers --------------------------------------------------------------------------------


@pytest.mark.parametrize("k", WIDTHS)
@pytest.mark.parametrize("name", MODELS)
def test_beam_search_equals_transformers_without_eos(name, k):
    """EOS ignored: every beam has the same length, and the k sequences are transformers', in its order,
    with its cumulative logprobs."""
    llm, hf, prompt, max_tokens = model_setup(name)
    ours = llm.beam_search([prompt], BeamSearchParams(k, max_tokens, length_penalty=1.0, ignore_eos=True))[0]
    theirs = hf_beam_search(hf, prompt, k, max_tokens, eos=None, length_penalty=1.0)
    assert [o["token_ids"] for o in ours["outputs"]] == [t for t, _ in theirs]
    if k > 1:  # transformers' score is cum_logprob / generated length
        assert [o["cumulative_logprob"] / max_tokens for o in ours["outputs"]] == pytest.approx(
            [s for _, s in theirs], abs=1e-4
        )
    assert idle(llm)


@pytest.mark.parametrize("k", WIDTHS)
@pytest.mark.parametrize("name", MODELS)
def test_beam_search_with_eos_follows_vllm_rules_over_transformers_logits(name, k):
    """EOS on, length_penalty 1: ours equals the vLLM-rules reference over transformers' logits, and the
    transformers-rules reference equals generate(early_stopping="never") itself (so the table's rows are right)."""
    llm, hf, prompt, max_tokens = model_setup(name)
    eos = llm.tokenizer.eos_token_ids  # stories260K's tokenizer ends a story on BOS too: [2, 1]
    ours = llm.beam_search([prompt], BeamSearchParams(k, max_tokens, length_penalty=1.0))[0]["outputs"]
    want = reference_beam_search(hf, prompt, k, max_tokens, eos, 1.0, "vllm")
    assert [o["token_ids"] for o in ours] == [t for t, _, _ in want]
    assert [o["score"] for o in ours] == pytest.approx([s for _, _, s in want], abs=1e-4)
    assert [o["finish_reason"] for o in ours] == ["stop" if t[-1] in eos else "length" for t, _, _ in want]
    theirs = hf_beam_search(hf, prompt, k, max_tokens, eos, 1.0)
    assert [t for t, _, _ in reference_beam_search(hf, prompt, k, max_tokens, eos, 1.0, "transformers")] == [
        t for t, _ in theirs
    ]
    assert idle(llm)


@pytest.mark.parametrize("length_penalty", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("name", ["tiny-llama", "stories260K"])
def test_length_penalty_divides_by_vllm_lengths(name, length_penalty):
    """Other length penalties, width 4: ours follows the vLLM-rules reference (lengths with the prompt), and the
    transformers-rules one (generated lengths, EOS counted) is generate's."""
    llm, hf, prompt, max_tokens = model_setup(name)
    eos = llm.tokenizer.eos_token_ids
    ours = llm.beam_search([prompt], BeamSearchParams(4, max_tokens, length_penalty=length_penalty))[0]["outputs"]
    want = reference_beam_search(hf, prompt, 4, max_tokens, eos, length_penalty, "vllm")
    assert [(o["token_ids"], o["score"]) for o in ours] == [(t, pytest.approx(s, abs=1e-4)) for t, _, s in want]
    theirs = hf_beam_search(hf, prompt, 4, max_tokens, eos, length_penalty)
    reference = reference_beam_search(hf, prompt, 4, max_tokens, eos, length_penalty, "transformers")
    assert [(t, pytest.approx(s, abs=1e-4)) for t, _, s in reference] == theirs


def test_the_two_rules_really_differ_on_some_model():
    """The table is not idle talk: on tiny-llama, width 4, EOS on, the libraries return different beams."""
    llm, hf, prompt, max_tokens = setup("tiny-llama")
    ours = llm.beam_search([prompt], BeamSearchParams(4, max_tokens, length_penalty=1.0))[0]["outputs"]
    theirs = hf_beam_search(hf, prompt, 4, max_tokens, [2], 1.0)
    assert [o["token_ids"] for o in ours] != [t for t, _ in theirs]


@pytest.mark.parametrize("name", MODELS)
def test_beam_width_1_is_greedy(name):
    """Width 1 with no length penalty: the completed EOS beam outscores the runner-up it leaves running."""
    llm, _, prompt, max_tokens = model_setup(name)
    greedy = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)[0]
    beam = llm.beam_search([prompt], BeamSearchParams(1, max_tokens, length_penalty=0.0))[0]
    assert beam["token_ids"] == greedy["token_ids"] and len(beam["outputs"]) == 1
    assert beam["text"] == greedy["text"]


# ---- the engine's side: shared blocks, nothing left behind ---------------------------------------------


def test_beams_share_blocks_and_each_holds_at_most_one_partial_block_of_its_own():
    """During a width-4 search, the blocks in use (from the block manager) are the distinct full-block prefixes
    of the live beams plus at most one partial block per beam: no beam holds a copy of a block another shares."""
    from nanovllm import LLM

    llm = LLM(str(TINY_MODELS / "tiny-llama"), block_size=4, enable_prefix_caching=False)
    bm, k = llm.block_manager, 4
    search = BeamSearch(llm, PROMPT, BeamSearchParams(k, 14, ignore_eos=True))
    copies, real_copy = [], llm.pool.copy_blocks
    llm.pool.copy_blocks = lambda pairs: (copies.append(len(pairs)), real_copy(pairs))
    rounds = 0
    while not search.done:
        update_searches([search])
        llm.step()
        if search.done or not search.live:
            continue
        seqs = [llm.requests[r] for r in search.request_ids]
        if any(s.is_finished for s in seqs):  # the last round: the engine has freed them already
            continue
        rounds += 1
        full_prefixes = {tuple(s.token_ids[: (i + 1) * 4]) for s in seqs for i in range(s.num_computed_tokens // 4)}
        in_use = sum(1 for b in bm.blocks if b.ref_count > 0)
        assert in_use <= len(full_prefixes) + k
        assert len(seqs) == 1 or in_use < sum(len(s.block_table) for s in seqs)  # k separate requests' blocks
        assert len(seqs) < k or sum(b.ref_count == k for b in bm.blocks) >= len(PROMPT) // 4  # the prompt's, shared
    assert rounds == 13 and all(n <= k for n in copies) and sum(copies) > 0  # copy on write: partial blocks only
    assert idle(llm)


def test_pool_is_free_after_an_exception_mid_search():
    llm, _, prompt, _ = setup("tiny-llama")
    calls = 0

    def fault(module, args):
        nonlocal calls
        calls += 1
        if calls == 5:
            raise RuntimeError("injected fault")

    handle = llm.model.model.layers[0].register_forward_pre_hook(fault)
    try:
        with pytest.raises(RuntimeError, match="injected"):
            llm.beam_search([prompt, prompt[:5]], BeamSearchParams(4, 10))
    finally:
        handle.remove()
    assert idle(llm)
    ok = llm.beam_search([prompt], BeamSearchParams(4, 10))[0]  # and the engine still works
    assert len(ok["outputs"]) == 4 and idle(llm)


def test_an_aborted_search_gives_every_block_back_and_says_so():
    llm, _, prompt, _ = setup("tiny-llama")
    search = BeamSearch(llm, prompt, BeamSearchParams(4, 10))
    for _ in range(4):
        update_searches([search])
        llm.step()
    assert len(search.request_ids) == 4
    search.abort()
    assert search.done and search.result()["finish_reason"] == "abort" and idle(llm)


def test_a_tiny_pool_parks_beams_without_deadlock_and_gets_the_same_beams(monkeypatch):
    """A pool that barely fits one search, three searches at once, a small token budget: beams are preempted and
    parked beams give their blocks back, yet each prompt gets the beams it gets alone."""
    from test_engine_core import engine

    from nanovllm.engine.beam_search import Status

    llm, _, prompt, _ = setup("tiny-llama")
    params, prompts = BeamSearchParams(4, 8, ignore_eos=True), [prompt, prompt[:6], prompt[2:]]
    alone = [[o["token_ids"] for o in llm.beam_search([p], params)[0]["outputs"]] for p in prompts]
    spilled, unstick = [], BeamSearch.unstick

    def counting_unstick(search):
        holding = [s for s in search.parked.values() if s.status is Status.RUNNING]
        unstick(search)
        spilled.extend(s for s in holding if s.status is Status.WAITING)

    monkeypatch.setattr(BeamSearch, "unstick", counting_unstick)
    small = engine(blocks=14, max_num_seqs=4, max_num_batched_tokens=8)
    both = small.beam_search(prompts, params)
    assert [[o["token_ids"] for o in r["outputs"]] for r in both] == alone
    assert small.stats["preemptions"] > 0 and spilled and idle(small)


def test_other_requests_run_alongside_a_search():
    llm, _, prompt, _ = setup("tiny-llama")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    alone = llm.generate([prompt], params, use_tqdm=False)[0]["token_ids"]
    rid = llm.add_request(prompt, params)
    llm.beam_search([prompt], BeamSearchParams(2, 4))
    while llm.has_unfinished():
        llm.step()
    assert llm.output(rid)["token_ids"] == alone
    llm.release(rid)
    assert idle(llm)


def test_chapter4_runs_the_same_beam_search():
    from chapters.ch04_continuous_batching import LLM

    llm, _, prompt, _ = setup("tiny-llama")
    params = BeamSearchParams(4, 8)
    ch04 = LLM(str(TINY_MODELS / "tiny-llama"), block_size=4).beam_search([prompt], params)[0]["outputs"]
    assert [o["token_ids"] for o in ch04] == [o["token_ids"] for o in llm.beam_search([prompt], params)[0]["outputs"]]


def test_the_books_block_tables_are_what_a_run_gives_now():
    """book/beam_blocks.txt and .svg come from tools/beam_blocks.py's run of the engine, not from a hand."""
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("beam_blocks", ROOT / "tools" / "beam_blocks.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    rounds = tool.block_tables()
    assert len(rounds) == 10 and all(len(tables) == 4 for tables in rounds)
    assert (ROOT / "book" / "beam_blocks.txt").read_text() == tool.render_text(rounds)
    assert (ROOT / "book" / "beam_blocks.svg").read_text() == tool.render_svg(rounds)


# ---- bad input at the boundary -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, error",
    [
        ({"beam_width": 0, "max_tokens": 4}, "beam_width must be >= 1"),
        ({"beam_width": 2.0, "max_tokens": 4}, "beam_width must be an integer"),
        ({"beam_width": MAX_BEAM_WIDTH + 1, "max_tokens": 4}, "beam_width must be below"),
        ({"beam_width": 2, "max_tokens": 0}, "max_tokens must be >= 1"),
        ({"beam_width": 2, "max_tokens": 4, "length_penalty": float("nan")}, "length_penalty must be a finite"),
        ({"beam_width": 2, "max_tokens": 4, "length_penalty": "1"}, "length_penalty must be a number"),
        ({"beam_width": 2, "max_tokens": 4, "ignore_eos": 1}, "ignore_eos must be True or False"),
    ],
)
def test_bad_beam_search_params_name_the_field(options, error):
    with pytest.raises(ValueError, match=error):
        BeamSearchParams(**options)


def test_bad_calls_fail_before_anything_runs():
    from test_engine_core import engine

    from nanovllm import LLM

    llm, _, prompt, _ = setup("tiny-llama")
    with pytest.raises(TypeError, match="BeamSearchParams"):
        llm.beam_search([prompt], SamplingParams())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.beam_search([prompt, [10**6]], BeamSearchParams(2, 4))
    small = engine(blocks=8)
    assert isinstance(small, LLM)
    with pytest.raises(ValueError, match="beam_width=8 .* KV blocks"):
        small.beam_search([prompt], BeamSearchParams(8, 20))
    assert idle(llm) and idle(small)


# ---- chapter 4, tasks 6 and 7 ------------------------------------------------------------------------------


def test_task6_beam_step_expands_completes_eos_and_keeps_the_best(impl):
    from nanovllm.engine.beam_search import Beam

    beams = [Beam([5], -1.0), Beam([6], -1.5)]
    top = [[(7, -0.1), (2, -0.2), (8, -3.0)], [(9, -0.05), (2, -0.3), (10, -0.4)]]  # token 2 is EOS
    live, done = impl.beam_step(beams, top, [], 2, 3, [2], False, 1.0)
    assert [(b.tokens, b.parent) for b in live] == [([5, 7], 0), ([6, 9], 1)]  # -1.1 and -1.55; EOS not live
    assert [b.cum_logprob for b in live] == pytest.approx([-1.1, -1.55])
    assert all(b.finish_reason is None for b in live)
    # completed: [5, 2] scores -1.2 / (3 + 1) = -0.3, [6, 2] -1.8 / 4 = -0.45 (the EOS is not counted)
    assert [(b.tokens, b.finish_reason, b.parent) for b in done] == [([5, 2], "stop", 0), ([6, 2], "stop", 1)]
    assert beams[0].tokens == [5] and beams[1].cum_logprob == -1.5  # the old beams are left as they were


def test_task6_beam_step_ignores_eos_when_asked_and_breaks_ties_in_order(impl):
    from nanovllm.engine.beam_search import Beam

    beams = [Beam([], 0.0), Beam([], 0.0)]
    top = [[(2, -0.5), (4, -0.5)], [(6, -0.5), (8, -0.1)]]
    live, done = impl.beam_step(beams, top, [], 3, 4, [2], True, 1.0)
    assert [b.tokens for b in live] == [[8], [2], [4]] and done == []  # equal scores: the earlier candidate first


@pytest.mark.parametrize(
    "short_cum, long_cum, winner",
    [
        (-1.2, -2.7, [3, 2]),  # -1.2 / 3 > -2.7 / 6; by generated lengths (2 and 5, or 1 and 4) the long one wins
        (-2.7, -5.1, [4, 5, 6, 7, 2]),  # -2.7 / 3 < -5.1 / 6; by cumulative logprob, or lengths 4 and 7, the short
    ],
)
def test_task6_beam_step_scores_completed_beams_with_the_length_penalty(impl, short_cum, long_cum, winner):
    """A completed beam of 2 tokens against one of 5 (prompt of 2, length penalty 1): keep the better by
    beam_score, whose length counts the prompt and not the EOS."""
    from nanovllm.engine.beam_search import Beam

    short = Beam([3, 2], short_cum, finish_reason="stop")
    beams = [Beam([4, 5, 6, 7], long_cum + 0.25)]
    live, done = impl.beam_step(beams, [[(2, -0.25), (9, -5.0)]], [short], 1, 2, [2], False, 1.0)
    assert len(done) == 1 and done[0].tokens == winner
    assert [b.tokens for b in live] == [[4, 5, 6, 7, 9]]


def test_all_tasks_engine_beam_search_follows_vllm_rules(impl):
    """The whole search, run by the engine on your chapter 4 functions (scheduler, sampler, beam_step)."""
    llm, hf, prompt, max_tokens = setup("tiny-llama")
    ours = llm.beam_search([prompt], BeamSearchParams(4, max_tokens))[0]["outputs"]
    want = reference_beam_search(hf, prompt, 4, max_tokens, [2], 1.0, "vllm")
    assert [o["token_ids"] for o in ours] == [t for t, _, _ in want]


def test_task7_best_of_keeps_the_n_most_likely_in_order(impl):
    results = [{"cumulative_logprob": v, "id": i} for i, v in enumerate([-3.0, -1.0, -2.0, -1.0, -0.5])]
    chosen = impl.best_of(results, 3)
    assert [r["id"] for r in chosen] == [4, 1, 3]  # -0.5, then the two -1.0 in their order
    assert chosen[0] is results[4] and len(impl.best_of(results, 9)) == 5
    assert [r["id"] for r in results] == [0, 1, 2, 3, 4]  # the candidates' list is not reordered


def test_all_tasks_generate_returns_best_of_as_chosen_by_your_function(impl):
    llm, _, prompt, _ = setup("tiny-llama")
    params = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, n=2, best_of=4, seed=7)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    every = llm.generate([prompt], SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, n=4, seed=7),
                         use_tqdm=False)[0]["outputs"]  # fmt: skip
    best = sorted(every, key=lambda o: -o["cumulative_logprob"])[:2]
    assert [o["token_ids"] for o in out["outputs"]] == [o["token_ids"] for o in best]
