"""Chapter 1's engine: no cache at all, so every new token re-runs the model over the whole sequence (O(n^2))."""

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

# Chapter 4 brings these; a chapter that silently ignored them would sample from the wrong distribution.
LATER_SAMPLING_FIELDS = (
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "stop",
    "include_stop_str_in_output",
    "min_tokens",  # chapter 4 bans EOS and stop ids until then; merely not stopping would change the tokens
    "n",  # from here on the final engine's: candidates sharing blocks, log-probabilities, logit bias, allowed ids
    "best_of",
    "logprobs",
    "prompt_logprobs",
    "logit_bias",
    "allowed_token_ids",
)
FINAL_ENGINE_FIELDS = set(LATER_SAMPLING_FIELDS[LATER_SAMPLING_FIELDS.index("n") :])


def no_cache_attention(
    layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec | None = None
) -> torch.Tensor:
    """The attention backend of chapter 1: K and V of the whole sequence arrive every step; nothing is kept.

    A layer with a spec (a sliding window, Gemma 2's soft cap and scale) brings it along: the same causal
    attention, through a mask narrowed to the window."""
    if spec is None:
        return causal_attention(q, k, v)
    return spec_causal_attention(q, k, v, spec)


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
    if temperature == 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


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
    tokens = list(prompt_ids)
    output: list[int] = []
    while True:
        ids = torch.tensor([tokens], device=model.lm_head.weight.device)  # (1, n)
        positions = torch.arange(len(tokens), device=ids.device)[None]  # (1, n)
        hidden = model(ids, positions, no_cache_attention)  # (1, n, E)
        logits = model.compute_logits(hidden[0, -1])  # (V,): only the last position is needed
        token = sample_token(logits, params.temperature, generator)
        tokens.append(token)
        output.append(token)
        reason = finish_reason(output, params, eos_ids, len(tokens), max_model_len)
        if reason is not None:
            return output, reason


class LLM:
    """Chapter 1's engine: prompts are generated one after another, each by the naive loop.

    Chapters 2 and 3 keep its loading, prompt checks and random streams, and replace generate().
    """

    chapter = "chapter 1"

    def __init__(
        self,
        model: str,
        dtype: str | torch.dtype | None = None,
        device: str = "cpu",
        max_model_len: int | None = None,
        seed: int = 0,
    ):
        check_engine_args(dtype=dtype, device=device, max_model_len=max_model_len, seed=seed)
        loaded = load_model(model, dtype=dtype, device=device)
        self.model, self.config, self.tokenizer = loaded.model, loaded.config, loaded.tokenizer
        self.max_model_len = context_length(self.config.max_model_len, max_model_len)
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    @property
    def kv_cache_bytes(self) -> int:
        """Memory held for K and V: none here, everything is recomputed."""
        return 0

    def prepare(
        self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams | Sequence[SamplingParams] | None
    ) -> list[tuple[list[int], SamplingParams]]:
        """Tokenize and check the prompts, pair them with their params; refuse what chapter 4 brings."""
        inputs = prepare_inputs(self.tokenizer, prompts, sampling_params, self.max_model_len, self.config.vocab_size)
        for i, (ids, params) in enumerate(inputs):
            if later := params.non_default(LATER_SAMPLING_FIELDS):
                where = "the final engine (nanovllm)" if set(later) <= FINAL_ENGINE_FIELDS else "chapter 4"
                raise ValueError(f"{self.chapter} samples with temperature only; {later} arrive in {where}")
            if params.greedy and params.temperature != 0.0:  # too small to divide the logits by: argmax
                inputs[i] = (ids, dataclasses.replace(params, temperature=0.0))
        return inputs

    def generator_for(self, params: SamplingParams) -> torch.Generator:
        """A seeded request gets its own random stream; the others share the engine's."""
        return request_generator(params, self.generator)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[dict]:
        outputs = []
        for prompt, params in tqdm(self.prepare(prompts, sampling_params), desc="generate", disable=not use_tqdm):
            gen = self.generator_for(params)
            tokens, reason = naive_generate(
                self.model, prompt, params, self.tokenizer.eos_token_ids, self.max_model_len, gen
            )
            outputs.append(make_output(self.tokenizer, prompt, tokens, reason))
        return outputs
