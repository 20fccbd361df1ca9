"""Model families. All four supported architectures share one decoder; ModelConfig records how they differ."""

from nanovllm.models.llama import DecoderForCausalLM

__all__ = ["DecoderForCausalLM"]
