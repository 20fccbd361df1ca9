"""One importable snapshot of the engine per chapter, all with the same API: LLM, SamplingParams, generate."""
