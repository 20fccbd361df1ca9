"""Chapter 2: prefill once, then decode one token per step from a contiguous KV cache; static batches with padding."""

from chapters.ch02_kv_cache.kv_cache import ContiguousKVCache, write_kv
from chapters.ch02_kv_cache.llm import LLM, generate_batch, right_pad
from nanovllm.layers.attention import padded_causal_mask
from nanovllm.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "SamplingParams",
    "ContiguousKVCache",
    "generate_batch",
    "right_pad",
    "padded_causal_mask",
    "write_kv",
]
