"""Chapter 6: the fixed cost of a step. This snapshot is the engine with chapter 6's pieces: decode steps from
static buffers padded to a batch-size bucket, captured as CUDA graphs on a GPU (nanovllm/engine/cuda_graphs.py)
and replayed eagerly on a CPU, q/k/v and gate/up fused into one matmul each (nanovllm/models/fused.py), and on a
CPU a C kernel for the matmuls of a decode step (nanovllm/kernels/linear_cpu.c); the attention backends of chapter 5.
Full precision."""

from __future__ import annotations

from chapters.ch05_triton_attention import LLM as Chapter5LLM
from nanovllm.engine.llm_engine import LLMEngine, StepOutput
from nanovllm.sampling_params import SamplingParams

CHAPTER6_OPTIONS = ("enforce_eager", "fuse_projections", "linear_kernel")  # what chapter 6 unpins


class LLM(Chapter5LLM):
    """The engine as chapter 6 leaves it: chapter 5's, with CUDA graphs (or their replay), fused projections and
    the C linear kernel for decode-sized matmuls on a CPU."""

    pinned = {k: v for k, v in Chapter5LLM.pinned.items() if k not in CHAPTER6_OPTIONS}
    # chapter 7's options stay pinned: quantization None (full precision)


__all__ = ["LLM", "LLMEngine", "SamplingParams", "StepOutput"]
