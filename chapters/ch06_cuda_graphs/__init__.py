"""Chapter 6: the fixed cost of a step. This snapshot is the engine with chapter 6's pieces: decode steps from
static buffers padded to a batch-size bucket, captured as CUDA graphs on a GPU (nanovllm/engine/cuda_graphs.py)
and replayed eagerly on a CPU, and q/k/v and gate/up fused into one matmul each (nanovllm/models/fused.py); the
attention backends of chapter 5. Full precision."""

from __future__ import annotations

from chapters.ch05_triton_attention import LLM as Chapter5LLM
from nanovllm.engine.llm_engine import LLMEngine, StepOutput
from nanovllm.sampling_params import SamplingParams


class LLM(Chapter5LLM):
    """The engine as chapter 6 leaves it: chapter 5's, with CUDA graphs (or their replay) and fused projections."""

    pinned = {k: v for k, v in Chapter5LLM.pinned.items() if k not in ("enforce_eager", "fuse_projections")}
    # chapter 7's options stay pinned: quantization None (full precision)


__all__ = ["LLM", "LLMEngine", "SamplingParams", "StepOutput"]
