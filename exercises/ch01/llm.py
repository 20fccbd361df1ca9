"""Exercises for ch01: your version of chapters.ch01_naive.llm.

Fill in each function marked with a task; the docstring says what it computes.
Check your work with: pytest --impl=exercises -m ch01 -k "task5|task6"
"""

from __future__ import annotations
import dataclasses
from collections.abc import Sequence
import torch
from tqdm.auto import tqdm
from nanovllm.engine.io import (
    Prompt,
    check_engine_args,
    context_length,
    finish_reason,
    make_output,
    prepare_inputs,
    request_generator,
)
from nanovllm.layers.attention import AttentionSpec, causal_attention, spec_causal_attention
from nanovllm.models import DecoderForCausalLM
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.loader import load_model
from chapters.ch01_naive.llm import LATER_SAMPLING_FIELDS, FINAL_ENGINE_FIELDS, no_cache_attention, LLM  # the rest of the file, as given


def sample_token(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """Pick the next token from one position's logits.

    temperature == 0: greedy, argmax(logits).
    temperature > 0: draw from softmax(logits / temperature), using `generator` so a
    seeded generator gives the same token every time. Lower temperature sharpens the
    distribution towards the argmax; higher flattens it.

    Args:
        logits: (V,) float32 logits of the last position.
        temperature: >= 0.
        generator: the random stream to draw from.
    Returns:
        the chosen token id.
    """
    raise NotImplementedError("ch01 task 5: greedy or temperature sampling")


@torch.inference_mode()
def naive_generate(
    model: DecoderForCausalLM,
    prompt_ids: list[int],
    params: SamplingParams,
    eos_ids: Sequence[int],
    max_model_len: int,
    generator: torch.Generator | None = None,
) -> tuple[list[int], str]:
    """Generate one sequence, re-running the model over all of its tokens at every step.

    Each step: run the model on the whole sequence so far (positions 0..n-1), take the
    logits of the last position, pick a token with `sample_token`, append it, and stop
    when `finish_reason` says so (EOS, a stop id, max_tokens, or the context is full).

    Args:
        model: the decoder; call it as model(ids (1, n), positions (1, n), attention backend)
            and turn hidden states into logits with model.compute_logits.
        prompt_ids: the prompt's token ids.
        params: temperature, max_tokens, ignore_eos, ...
        eos_ids: the model's end-of-sequence ids.
        max_model_len: the context length; the sequence never grows past it.
        generator: the random stream for sampling.
    Returns:
        (generated token ids, finish reason).
    """
    raise NotImplementedError("ch01 task 6: the naive generation loop")
