"""Chapter 5: attention kernels in Triton. This snapshot is the engine with chapter 5's attention backends: the Triton
kernels (nanovllm/kernels/triton: KV store, paged decode with split-K, variable-length prefill over the pool) first,
which 'auto' picks on a GPU; on a CPU 'auto' keeps chapter 4's C kernel (Triton has no CPU backend; its interpreter,
attention_backend="triton", checks the kernels' tokens there). No CUDA graphs, full precision."""

from __future__ import annotations

from chapters.ch04_continuous_batching import LLM as Chapter4LLM
from nanovllm.engine.llm_engine import LLMEngine, StepOutput
from nanovllm.sampling_params import SamplingParams


class LLM(Chapter4LLM):
    """The engine as chapter 5 leaves it: chapter 4's, with the Triton attention backend."""

    attention_backends = ("triton", "torch", "c")
    pinned = dict(Chapter4LLM.pinned)  # chapter 6 and 7's options, held where chapter 5 has them


__all__ = ["LLM", "LLMEngine", "SamplingParams", "StepOutput"]
