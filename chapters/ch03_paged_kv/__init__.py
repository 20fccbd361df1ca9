"""Chapter 3: KV in fixed-size blocks shared by all sequences: block manager, block tables, prefix caching."""

from chapters.ch03_paged_kv.llm import LLM, PagedAttention
from nanovllm.sampling_params import SamplingParams

__all__ = ["LLM", "PagedAttention", "SamplingParams"]
