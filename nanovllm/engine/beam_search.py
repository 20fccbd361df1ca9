"""Beam search with vLLM's semantics, on the engine: each beam is a request, and beams fork from one another.

A round: every live beam of a prompt runs one engine step (a prefill for the first round, then one decode each),
which gives its 2 x beam_width most likely next tokens. `beam_step` expands every beam by those tokens, moves the
ones ending in EOS to `completed`, and keeps the beam_width best of the rest. The engine then forks the beams that
go on more than once (the copies share all their KV blocks by reference count; the first write into a shared,
partly filled last block copies that one block) and frees the beams that no candidate extends. After max_tokens
rounds the beam_width best of completed + live, by `beam_score`, are the answer, best first.

A beam that has run its round waits ("parked", off the scheduler's running list, its blocks kept) until every
other beam of its prompt has run too. If the parked beams leave the pool too full for anything to run, they give
their blocks back and are computed again (mostly from the prefix cache) when their round is decided.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from nanovllm.engine.block_manager import worst_case_tokens
from nanovllm.engine.io import Prompt, prepare_inputs
from nanovllm.engine.sequence import Sequence, Status
from nanovllm.sampling_params import INT32_END, MAX_LOGPROBS, SamplingParams, _flag, _integer, _number
from nanovllm.utils.tokenizer import incremental_text

MAX_BEAM_WIDTH = MAX_LOGPROBS // 2  # each beam asks for its 2 x beam_width most likely tokens, as logprobs


@dataclass
class BeamSearchParams:
    beam_width: int  # beams kept per prompt, and sequences returned; at most MAX_BEAM_WIDTH
    max_tokens: int  # rounds (tokens per beam), below 2**31; fewer if the context fills first
    length_penalty: float = 1.0  # score = cumulative logprob / length ** length_penalty (length with the prompt)
    ignore_eos: bool = False  # EOS is an ordinary token: no beam completes before max_tokens

    def __post_init__(self) -> None:
        _integer("beam_width", self.beam_width, low=1, high=MAX_BEAM_WIDTH + 1)
        _integer("max_tokens", self.max_tokens, low=1, high=INT32_END)
        _number("length_penalty", self.length_penalty)
        _flag("ignore_eos", self.ignore_eos)


@dataclass
class Beam:
    tokens: list[int]  # generated so far (the prompt is not repeated)
    cum_logprob: float = 0.0
    parent: int = -1  # the index, among the previous round's live beams, of the beam this one extends
    finish_reason: str | None = None  # 'stop' (ended in EOS) or 'length' once completed; None while live


def beam_score(beam: Beam, prompt_len: int, length_penalty: float) -> float:
    """vLLM's score: cum_logprob / length ** length_penalty, where the length counts the prompt too, and not the
    EOS of a beam that ended in one. (transformers divides by the generated length, EOS included.)"""
    length = prompt_len + len(beam.tokens) - (beam.finish_reason == "stop")
    return beam.cum_logprob / length**length_penalty


def beam_step(
    beams: list[Beam],
    top: list[list[tuple[int, float]]],
    completed: list[Beam],
    width: int,
    prompt_len: int,
    eos_ids: Seq[int],
    ignore_eos: bool,
    length_penalty: float,
) -> tuple[list[Beam], list[Beam]]:
    """One round of beam search: expand, score with the length penalty, prune.

    Args:
        beams: the live beams.
        top: for each live beam, its most likely next tokens as (token, logprob) pairs (2 x width of them).
        completed: the beams that already ended in EOS (at most `width`, best first).
        width: the beam width.
        prompt_len, length_penalty: for beam_score(beam, prompt_len, length_penalty).
        eos_ids, ignore_eos: a token in eos_ids completes its beam (finish_reason 'stop'), unless ignore_eos.
    Returns:
        (live, completed): the `width` best new live beams and the `width` best completed ones, each list sorted
        by beam_score, best first (a stable sort: on a tie the earlier beam, then the likelier token, first).
        A new beam is Beam(parent's tokens + [token], parent's cum_logprob + logprob, parent=its parent's index).
    """
    live, done = [], list(completed)
    for i, (beam, alternatives) in enumerate(zip(beams, top)):
        for token, logprob in alternatives:
            child = Beam([*beam.tokens, token], beam.cum_logprob + logprob, parent=i)
            if token in eos_ids and not ignore_eos:
                child.finish_reason = "stop"
                done.append(child)
            else:
                live.append(child)

    def score(b: Beam) -> float:
        return beam_score(b, prompt_len, length_penalty)

    # keeping only the `width` best completed ones each round changes nothing: the answer is the width best of all
    return sorted(live, key=score, reverse=True)[:width], sorted(done, key=score, reverse=True)[:width]


def blocks_needed(prompt_len: int, params: BeamSearchParams, max_tokens: int, block_size: int) -> int:
    """The most blocks one prompt's beams hold at once: the prompt's full blocks, shared, and each beam's own rest."""
    shared = prompt_len // block_size
    own = -(-worst_case_tokens(prompt_len, max_tokens, prompt_len + max_tokens) // block_size) - shared
    return shared + params.beam_width * own


@dataclass
class BeamSearch:
    """One prompt's beam search on a running engine. Right before every engine step, call update_searches with
    every search under way (the engine's own beam_search does); done is True once result() is final. abort() ends
    it and gives every block back. Only the thread that updates the searches may step the engine meanwhile."""

    engine: object  # the LLMEngine
    prompt_ids: list[int]
    params: BeamSearchParams
    live: list[Beam] = field(default_factory=list)
    request_ids: list[int] = field(default_factory=list)  # the engine request holding each live beam's KV
    completed: list[Beam] = field(default_factory=list)
    parked: dict[int, Sequence] = field(default_factory=dict)  # beams that ran this round, off the running list
    done: bool = False
    finish_reason: str | None = None  # 'error' or 'abort' when it ended early
    error: str | None = None

    def __post_init__(self) -> None:
        eng = self.engine
        self.max_tokens = min(self.params.max_tokens, eng.max_model_len - len(self.prompt_ids))
        # greedy, so the engine's own draw is the likeliest token; the beam search overwrites it with its choice
        self.request = SamplingParams(
            temperature=0.0, max_tokens=self.max_tokens, ignore_eos=True, logprobs=2 * self.params.beam_width
        )
        with eng.lock:
            rid = eng._add(self.prompt_ids, self.request)
            # a beam is a request of its own, in no group: pruning one must not abort the beams forked from it
            eng.groups.pop(rid, None)
        self.live, self.request_ids = [Beam([])], [rid]

    # ---- the engine's side ------------------------------------------------------------------------------

    def update(self) -> None:
        """Park the beams that ran in the last step; once every live beam has run, decide the round."""
        eng = self.engine
        with eng.lock:
            if self.done:
                return
            for beam, rid in zip(self.live, self.request_ids):
                seq = eng.requests.get(rid)
                if seq is None or seq.finish_reason in ("abort", "error"):
                    reason = "abort" if seq is None else seq.finish_reason
                    self.abort(reason, seq.error if seq is not None else None)
                    return
                if rid not in self.parked and len(seq.output_ids) > len(beam.tokens):
                    self._park(rid, seq)
            if len(self.parked) == len(self.request_ids):
                self._decide()

    def _park(self, rid: int, seq: Sequence) -> None:
        if seq in self.engine.scheduler.running:  # not once the engine has finished it (its last round)
            self.engine.scheduler.running.remove(seq)
        self.parked[rid] = seq

    def _unpark(self, rid: int) -> None:
        seq = self.parked.pop(rid)
        if seq.status is Status.RUNNING:
            self.engine.scheduler.running.append(seq)
        elif seq.status is Status.WAITING:  # it gave its blocks back: admitted and computed again
            self.engine.scheduler.add(seq)

    def unstick(self) -> None:
        """If the next step might find nothing it can run, the parked beams give their blocks back.

        The step surely runs something if every running sequence can take its next block (one at most) without
        preempting any, or, with none running, if the first waiting one fits. Otherwise the scheduler may preempt
        every running sequence and then find the pool held by parked beams, which it cannot preempt."""
        sched, bm = self.engine.scheduler, self.engine.block_manager
        with self.engine.lock:
            free = bm.num_free_blocks
            if sched.running and free >= len(sched.running):
                return
            if not sched.running and (not sched.waiting or bm.blocks_needed(sched.waiting[0]) <= free):
                return
            for seq in self.parked.values():
                if seq.status is Status.RUNNING:
                    bm.free(seq)
                    seq.status = Status.WAITING

    def _decide(self) -> None:
        eng, p = self.engine, self.params
        top = [self.parked[rid].token_logprobs[-1][1] for rid in self.request_ids]
        live, self.completed = beam_step(
            self.live,
            top,
            self.completed,
            p.beam_width,
            len(self.prompt_ids),
            eng.tokenizer.eos_token_ids,
            p.ignore_eos,
            p.length_penalty,
        )
        if not live or len(live[0].tokens) >= self.max_tokens:
            for beam in live:
                beam.finish_reason = "length"
            self.completed, self.live = [*self.completed, *live], []
            self._end()
            return
        children: dict[int, list[int]] = {}  # parent -> the new beams that extend it
        for j, beam in enumerate(live):
            children.setdefault(beam.parent, []).append(j)
        for i, rid in enumerate(self.request_ids):  # free the pruned beams first: their blocks serve the forks
            if i not in children:
                self._release(rid)
        request_ids = [0] * len(live)
        for i, js in children.items():
            rid = self.request_ids[i]
            request_ids[js[0]] = rid
            for j in js[1:]:
                request_ids[j] = eng.fork(rid)  # shares every block of the parent
        for beam, rid in zip(live, request_ids):
            seq = eng.requests[rid]
            # the last token's K/V are not computed yet (the next step does), so it may still change
            assert seq.num_computed_tokens < len(seq)
            seq.token_ids[-1] = beam.tokens[-1]
            beam.parent = -1
        for i in children:
            self._unpark(self.request_ids[i])  # its forks start on a queue already
        self.live, self.request_ids = live, request_ids

    def _release(self, rid: int) -> None:
        if rid in self.parked:
            self._unpark(rid)  # back on a queue, so finishing it frees its blocks
        self.engine.release(rid)

    def _end(self) -> None:
        for rid in self.request_ids:
            self._release(rid)
        self.request_ids, self.done = [], True

    def abort(self, reason: str = "abort", error: str | None = None) -> None:
        """Stop now (or fail, reason 'error'): every beam's blocks go back to the pool."""
        with self.engine.lock:
            if not self.done:
                self.finish_reason, self.error = reason, error
                self.live, self.completed = [], []
                self._end()

    # ---- the caller's side ------------------------------------------------------------------------------

    def result(self) -> dict:
        """The best sequence's fields, and under "outputs" the beam_width best, best first: text, token_ids (EOS
        included, as generate gives them), finish_reason, cumulative_logprob and score."""
        eng, p = self.engine, self.params
        key = lambda b: beam_score(b, len(self.prompt_ids), p.length_penalty)  # noqa: E731
        outputs = [
            {
                "text": incremental_text(eng.tokenizer, self.prompt_ids, b.tokens),
                "token_ids": b.tokens,
                "finish_reason": b.finish_reason,
                "cumulative_logprob": b.cum_logprob,
                "score": key(b),
            }
            for b in sorted(self.completed, key=key, reverse=True)[: p.beam_width]
        ]
        if not outputs:
            failed = {"text": "", "token_ids": [], "finish_reason": self.finish_reason or "abort", "outputs": []}
            return failed | ({"error": self.error} if self.error else {})
        return {**outputs[0], "outputs": outputs}


def update_searches(searches: Seq[BeamSearch]) -> None:
    """Right before every engine step: every search takes the tokens its beams got in the step before, then (once
    all have, as one search's decision can free or take blocks) each gives its parked beams' blocks back if the
    step could run nothing otherwise."""
    for s in searches:
        s.update()
    for s in searches:
        s.unstick()


def beam_search(engine, prompts: Prompt | Seq[Prompt], params: BeamSearchParams) -> list[dict]:
    """LLMEngine.beam_search: run every prompt's beam search to the end; results in order (BeamSearch.result).

    Other requests keep running alongside (their step outputs are kept for the next step() call). Whatever
    happens, every beam is aborted and released before this returns or raises."""
    if not isinstance(params, BeamSearchParams):
        raise TypeError(f"params must be BeamSearchParams, got {type(params).__name__}")
    inputs = prepare_inputs(engine.tokenizer, prompts, None, engine.max_model_len, engine.config.vocab_size)
    bm = engine.block_manager
    for ids, _ in inputs:
        need = blocks_needed(len(ids), params, min(params.max_tokens, engine.max_model_len - len(ids)), bm.block_size)
        if need > bm.num_blocks:
            raise ValueError(
                f"beam search over {len(ids)} prompt tokens with beam_width={params.beam_width} and "
                f"max_tokens={params.max_tokens} may hold {need} KV blocks, but the whole pool has {bm.num_blocks}: "
                "raise kv_cache_memory, or lower beam_width or max_tokens"
            )
    searches: list[BeamSearch] = []
    try:
        searches = [BeamSearch(engine, ids, params) for ids, _ in inputs]
        while True:
            with engine.lock:
                update_searches(searches)
                if all(s.done for s in searches):
                    break
                if not engine.scheduler.has_unfinished():
                    raise RuntimeError("beam search: no beam is left to run, yet a search has not ended")
                mine = {rid for s in searches for rid in s.request_ids}
                outs = engine._step()
                engine.undelivered += [o for o in outs if o.request_id not in mine]
        return [s.result() for s in searches]
    finally:
        for s in searches:
            s.abort()
