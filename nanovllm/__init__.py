"""nano-vLLM: a small, real LLM inference engine. `LLM(model).generate(prompts, SamplingParams(...))`."""

from nanovllm.engine.beam_search import BeamSearchParams
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.sampling_params import SamplingParams

LLM = LLMEngine
__version__ = "0.1.0"

__all__ = ["LLM", "BeamSearchParams", "LLMEngine", "SamplingParams", "__version__"]
