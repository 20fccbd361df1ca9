"""Chapter 4: continuous batching. The scheduler, the flattened batch and the sampler live in nanovllm.engine,
in their final form; this snapshot is that engine with chapter 4's pieces: paged attention in PyTorch, with a C
kernel for the decodes on the CPU (nanovllm/kernels), no CUDA graphs, full precision."""

from nanovllm.engine.llm_engine import LLMEngine, StepOutput
from nanovllm.sampling_params import SamplingParams

LLM = LLMEngine

__all__ = ["LLM", "LLMEngine", "SamplingParams", "StepOutput"]
