"""The engine's boundary, shared by every chapter: prompts in (validated), finish rules, outputs out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch

from nanovllm.errors import PromptTooLongError
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.tokenizer import Tokenizer, incremental_text

Prompt = Union[str, list[int]]  # noqa: UP007 (a runtime alias: `|` needs Python 3.10 objects)


def prepare_inputs(
    tokenizer: Tokenizer,
    prompts: Prompt | Sequence[Prompt],
    sampling_params: SamplingParams | Sequence[SamplingParams] | None,
    max_model_len: int,
    vocab_size: int,
) -> list[tuple[list[int], SamplingParams]]:
    """Tokenize and check every prompt, and pair it with its SamplingParams (one for all, or one each)."""
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]  # a single prompt
    prompts = list(prompts)
    if sampling_params is None:
        sampling_params = SamplingParams()
    if isinstance(sampling_params, SamplingParams):
        params = [sampling_params] * len(prompts)
    else:
        params = list(sampling_params)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} SamplingParams")
    for p in params:
        if not isinstance(p, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(p).__name__}")
        if bad := [t for t in p.stop_token_ids if t >= vocab_size]:
            raise ValueError(f"stop_token_ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    return [(prompt_ids(tokenizer, p, max_model_len, vocab_size), sp) for p, sp in zip(prompts, params)]


def prompt_ids(tokenizer: Tokenizer, prompt: Prompt, max_model_len: int, vocab_size: int) -> list[int]:
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    else:
        raise TypeError(f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")
    if not ids:
        raise ValueError("empty prompt: give at least one token (or a tokenizer that adds BOS)")
    if len(ids) >= max_model_len:
        raise PromptTooLongError(
            f"prompt has {len(ids)} tokens, but the model's context is {max_model_len} tokens, "
            f"which leaves no room to generate"
        )
    return ids


def finish_reason(
    output_ids: list[int], params: SamplingParams, eos_ids: Sequence[int], seq_len: int, max_model_len: int
) -> str | None:
    """'stop' (EOS or a stop id), 'length' (max_tokens or the context is full), or None to go on."""
    last = output_ids[-1]
    if len(output_ids) >= params.min_tokens:
        if last in params.stop_token_ids or (not params.ignore_eos and last in eos_ids):
            return "stop"
    if len(output_ids) >= params.max_tokens or seq_len >= max_model_len:
        return "length"
    return None


def make_output(
    tokenizer: Tokenizer, prompt: list[int], output: list[int], reason: str | None, text_end: int | None = None
) -> dict:
    """One result: the generated text (cut at text_end, where a stop string matched) and tokens (the prompt is
    not repeated), and why it stopped."""
    text = incremental_text(tokenizer, prompt, output)
    return {"text": text[:text_end] if text_end is not None else text, "token_ids": output, "finish_reason": reason}


def request_generator(params: SamplingParams, shared: torch.Generator) -> torch.Generator:
    """A seeded request gets its own random stream (same seed, same tokens, whatever shares its batch);
    the others draw from the engine's shared one."""
    if params.seed is None:
        return shared
    return torch.Generator(shared.device).manual_seed(params.seed)


def stop_string_cut(text: str, stop: list[str], include: bool, searched: int = 0) -> int | None:
    """Where the output text ends if a stop string ends after `searched` (earliest match), else None.

    `searched` is how much of the text earlier steps already searched: only a stop string that the
    new text completes can match, so each step's search is short and text from before min_tokens is skipped.
    """
    hits = [(i, s) for s in stop if (i := text.find(s, max(0, searched - len(s) + 1))) >= 0]
    if not hits:
        return None
    index, s = min(hits)
    return index + len(s) if include else index
