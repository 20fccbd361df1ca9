"""Chapter 7: weight-only INT8 and INT4 quantization, the last chapter. Its snapshot is the engine itself, not a copy:
`LLM(model, quantization="int8" | "int4")` quantizes every linear layer at load time (nanovllm/layers/quantization.py)
and multiplies by the quantized bytes in C kernels on the CPU (nanovllm/kernels). Chapters 4-6 keep their pinned
configurations; this one has every option the engine has."""

from nanovllm import LLM, LLMEngine, SamplingParams
from nanovllm.engine.llm_engine import StepOutput

__all__ = ["LLM", "LLMEngine", "SamplingParams", "StepOutput"]
