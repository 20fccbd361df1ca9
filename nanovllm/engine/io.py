"""The engine's boundary, shared by every chapter: prompts in (validated), finish rules, outputs out."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Union

import torch

from nanovllm.errors import PromptTooLongError
from nanovllm.layers.linear import LINEAR_KERNELS
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.loader import check_device, parse_quantization, resolve_dtype
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
    elif isinstance(prompts, (bytes, bytearray, dict, set, frozenset)) or not isinstance(prompts, Iterable):
        raise TypeError(f"prompts must be a string, a list of token ids, or a list of those; got {_describe(prompts)}")
    prompts = list(prompts)
    if sampling_params is None:
        sampling_params = SamplingParams()
    if isinstance(sampling_params, SamplingParams):
        params = [sampling_params] * len(prompts)
    elif not isinstance(sampling_params, (list, tuple)):
        raise TypeError(
            f"sampling_params must be SamplingParams or a list of them, got {type(sampling_params).__name__}"
        )
    else:
        params = list(sampling_params)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} SamplingParams")
    for p in params:
        if not isinstance(p, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(p).__name__}")
        for name, ids in (("stop_token_ids", p.stop_token_ids), ("logit_bias", p.logit_bias or ()),
                          ("allowed_token_ids", p.allowed_token_ids or ())):  # fmt: skip
            if bad := [t for t in ids if t >= vocab_size]:
                raise ValueError(f"{name} has token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")
        ends = set(p.stop_token_ids) | (set() if p.ignore_eos else set(tokenizer.eos_token_ids))
        if p.allowed_token_ids and p.min_tokens and set(p.allowed_token_ids) <= ends:  # every logit would be -inf
            raise ValueError(
                f"allowed_token_ids {p.allowed_token_ids[:5]} are all EOS or stop ids, which min_tokens={p.min_tokens} "
                f"bans: no token could be generated"
            )
    return [(prompt_ids(tokenizer, p, max_model_len, vocab_size), sp) for p, sp in zip(prompts, params)]


def check_prompt(prompt: object) -> None:
    """One prompt is a string or a list of token ids (integers); anything else is a TypeError naming it.

    add_request calls this before wrapping its prompt in a list: [5] would pass for a one-token prompt."""
    if isinstance(prompt, (list, tuple)):
        if wrong := [t for t in prompt if isinstance(t, bool) or not isinstance(t, int)]:
            raise TypeError(f"a prompt of token ids must hold integers only, got {_describe(wrong[0])} in it")
    elif not isinstance(prompt, str):
        raise TypeError(f"a prompt is a string or a list of token ids, got {_describe(prompt)}")


def prompt_ids(tokenizer: Tokenizer, prompt: Prompt, max_model_len: int, vocab_size: int) -> list[int]:
    check_prompt(prompt)
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
        # a tokenizer may hold more tokens than the model's embedding (added special tokens past vocab_size)
        if bad := [t for t in ids if not 0 <= t < vocab_size]:
            raise ValueError(
                f"prompt {_short(prompt)} encodes to token ids {bad[:5]}, outside the vocabulary [0, {vocab_size}) "
                f"of the model: its tokenizer knows tokens its embedding has no row for"
            )
    else:
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
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


def _short(value: object) -> str:
    text = repr(value)
    return text[:40] + "..." if len(text) > 43 else text


def _describe(value: object) -> str:
    """A value for an error message: its type, and its repr cut short."""
    return f"{type(value).__name__} {_short(value)}"


# ---- engine arguments: one check for every chapter's LLM and for LLMEngine ------------------------------


def context_length(model_context: int, asked: int | None) -> int:
    """The context an engine runs: max_model_len when given, else the model's own. More than the model's is refused,
    as vLLM does: positions past it were never trained (and a silently shorter context would surprise later)."""
    if asked is not None and asked > model_context:
        raise ValueError(
            f"max_model_len={asked} is longer than the model's context of {model_context} tokens "
            f"(max_position_embeddings in its config.json); ask for at most {model_context}, or leave it unset"
        )
    return asked or model_context


def check_engine_args(**args: object) -> None:
    """Refuse an engine argument of the wrong type (TypeError) or value (ValueError), naming it, before any
    model is loaded. Every chapter's LLM and LLMEngine pass the arguments they take, by name."""
    for name, value in args.items():
        check = _ENGINE_ARGS.get(name)
        if check is None:
            raise TypeError(f"check_engine_args: no rule for an argument named {name!r}")
        check(name, value)


def _count(low: int, optional: bool = False, high: int = 2**31):
    """An integer in [low, high) (None too, when optional): a float or out of range is a ValueError."""

    def check(name: str, value: object) -> None:
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be an integer >= {low}, got {_describe(value)}")
        if not isinstance(value, int) or not low <= value < high:
            raise ValueError(f"{name} must be an integer >= {low}, below 2**{high.bit_length() - 1}, got {value!r}")

    return check


def _kv_cache_memory(name: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of bytes (or None for the default), got {_describe(value)}")
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"{name} must be a number of bytes >= 1 (or None for the default), got {value!r}")


def _fraction(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in (0, 1], got {_describe(value)}")
    if not 0.0 < value <= 1.0:  # NaN fails this too
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")


def _flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {_describe(value)}")


def _optional_flag(name: str, value: object) -> None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{name} must be True, False or None, got {_describe(value)}")


def _text(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {_describe(value)}")


def _linear_kernel(name: str, value: object) -> None:
    choices = " or ".join(map(repr, LINEAR_KERNELS))
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be {choices} or None, got {_describe(value)}")
    if value is not None and value not in LINEAR_KERNELS:
        raise ValueError(f"{name} must be {choices} or None, got {value!r}")


KV_CACHE_DTYPES = ("auto", "bfloat16")


def _kv_cache_dtype(name: str, value: object) -> None:
    choices = " or ".join(map(repr, KV_CACHE_DTYPES))
    if not isinstance(value, str):
        raise TypeError(f"{name} must be {choices}, got {_describe(value)}")
    if value not in KV_CACHE_DTYPES:
        raise ValueError(f"{name} must be {choices} ('auto': the model's dtype), got {value!r}")


_ENGINE_ARGS = {
    "dtype": lambda name, value: resolve_dtype(value),
    "device": lambda name, value: check_device(value),
    "max_model_len": _count(1, optional=True),
    "seed": _count(0, high=2**64),  # what torch.Generator.manual_seed takes
    "max_num_seqs": _count(1),
    "max_num_batched_tokens": _count(1),
    "block_size": _count(1),
    "kv_cache_memory": _kv_cache_memory,
    "kv_cache_dtype": _kv_cache_dtype,
    "gpu_memory_utilization": _fraction,
    "enable_prefix_caching": _flag,
    "enable_chunked_prefill": _flag,
    "attention_backend": _text,  # its values are checked where the backend is chosen
    "enforce_eager": _optional_flag,  # chapter 6: None lets the device decide
    "fuse_projections": _flag,
    "linear_kernel": _linear_kernel,
    "quantization": lambda name, value: parse_quantization(value),  # chapter 7
    "quantize_lm_head": _flag,
    "tensor_parallel_size": _count(1, high=1024),  # beyond one device
}
