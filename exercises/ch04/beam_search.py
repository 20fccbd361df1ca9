"""Exercises for ch04: your version of nanovllm.engine.beam_search.

Fill in each function marked with a task; the docstring says what it computes.
Check your work with: pytest --impl=exercises -m ch04 -k "task6"
"""

from __future__ import annotations
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from nanovllm.engine.block_manager import worst_case_tokens
from nanovllm.engine.io import Prompt, prepare_inputs
from nanovllm.engine.sequence import Sequence, Status
from nanovllm.sampling_params import INT32_END, MAX_LOGPROBS, SamplingParams, _flag, _integer, _number
from nanovllm.utils.tokenizer import incremental_text
from nanovllm.engine.beam_search import MAX_BEAM_WIDTH, BeamSearchParams, Beam, beam_score, blocks_needed, BeamSearch, update_searches, beam_search  # the rest of the file, as given


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
    raise NotImplementedError("ch04 task 6: one beam-search round: expand, score, prune")
