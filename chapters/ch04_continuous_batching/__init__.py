"""Chapter 4: continuous batching. The scheduler, the flattened batch and the sampler live in nanovllm.engine,
in their final form; this snapshot is that engine pinned to chapter 4's pieces: paged attention in PyTorch, with a
C kernel for the decodes on the CPU (nanovllm/kernels), no CUDA graphs, full precision. Later chapters add options
to the engine; this class keeps each of them at chapter 4's setting, so chapter 4's tokens and speed stay put."""

from __future__ import annotations

import inspect

from nanovllm.engine.llm_engine import LLMEngine, StepOutput
from nanovllm.sampling_params import SamplingParams


class LLM(LLMEngine):
    """The engine as chapter 4 builds it."""

    attention_backends = ("torch", "c")  # chapter 5's Triton kernels are not chapter 4's
    # engine options that later chapters add, and the value chapter 4 holds them at (a test checks the list)
    pinned: dict[str, object] = {
        "kv_cache_dtype": "auto",  # the KV cache in the model's dtype (16 bits: the final engine's option)
        "enforce_eager": True,  # chapter 6's
        "fuse_projections": False,
        "linear_kernel": "torch",
        "quantization": None,  # chapter 7's
        "quantize_lm_head": True,
        "tensor_parallel_size": 1,  # beyond one device: the engine's, after chapter 7
    }

    def __init__(self, model: str = "default", *args, **options):
        """LLMEngine's arguments, less those `pinned` holds."""
        if clash := sorted(set(options) & set(self.pinned)):
            raise TypeError(f"{type(self).__module__} does not have {clash}: they arrive in later chapters")
        super().__init__(model, *args, **options, **self.pinned)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.__signature__ = pinned_signature(cls)


def pinned_signature(cls: type[LLMEngine]) -> inspect.Signature:
    """What help() and inspect show for a chapter's LLM: the engine's parameters, less the ones it pins."""
    engine = inspect.signature(LLMEngine)
    return engine.replace(parameters=[p for name, p in engine.parameters.items() if name not in cls.pinned])


LLM.__signature__ = pinned_signature(LLM)


__all__ = ["LLM", "LLMEngine", "SamplingParams", "StepOutput"]
