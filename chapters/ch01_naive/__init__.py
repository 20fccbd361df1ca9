"""Chapter 1: the decoder written from scratch, and the naive loop that re-runs the whole sequence every step."""

from chapters.ch01_naive.llm import LLM, naive_generate, sample_token
from nanovllm.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "naive_generate", "sample_token"]
