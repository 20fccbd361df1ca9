"""Exercises for ch02: your version of chapters.ch02_kv_cache.llm.

Fill in each function marked with a task; the docstring says what it computes.
Check your work with: pytest --impl=exercises -m ch02 -k "task3|task4"
"""

from __future__ import annotations
from collections.abc import Sequence
import torch
from tqdm.auto import tqdm
from chapters.ch01_naive.llm import LLM as Chapter1LLM
from chapters.ch01_naive.llm import sample_token
from chapters.ch02_kv_cache.kv_cache import ContiguousKVCache
from nanovllm.engine.io import Prompt, check_engine_args, finish_reason, make_output
from nanovllm.engine.kv_cache import KVPool
from nanovllm.models import DecoderForCausalLM
from nanovllm.sampling_params import SamplingParams
from chapters.ch02_kv_cache.llm import LLM  # the rest of the file, as given


def right_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack prompts of different lengths into one batch, padding each on the right.

    Args:
        prompts: B lists of token ids.
        pad_id: the id written into padding (any valid id: padding is never attended to).
    Returns:
        ids (B, T) with T the longest prompt; positions (B, T) = 0 .. T-1 in every row
        (a padding token's position is its slot, which a later decode step overwrites);
        lengths (B,) the real length of each prompt.
    """
    raise NotImplementedError("ch02 task 3: batch prompts of different lengths")


@torch.inference_mode()
def generate_batch(
    model: DecoderForCausalLM,
    prompts: list[list[int]],
    params: list[SamplingParams],
    eos_ids: Sequence[int],
    max_model_len: int,
    generators: list[torch.Generator],
    cache: ContiguousKVCache,
) -> list[tuple[list[int], str]]:
    """Generate a static batch: one prefill over the padded prompts, then one decode step per token.

    Prefill: right_pad the prompts, cache.begin_step(positions), run the model once, and
    sample each row's first token from the logits at its last real position (lengths - 1).
    Decode: feed each row's newest token at its next position (B, 1); the cache supplies the
    past. A finished row keeps riding along (static batching) but its tokens are not kept; the
    batch ends when every row has a finish_reason.

    Args:
        model: the decoder; model(ids, positions, cache) -> hidden states.
        prompts: B prompts (token ids).
        params: one SamplingParams per prompt.
        eos_ids: end-of-sequence ids.
        max_model_len: the context length.
        generators: one random stream per prompt.
        cache: a ContiguousKVCache with at least B rows.
    Returns:
        B pairs (generated token ids, finish reason), in prompt order.
    """
    raise NotImplementedError("ch02 task 4: prefill once, then decode from the cache")
