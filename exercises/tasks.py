"""The exercise tasks of every chapter: the one table the stub generator, the tests and the book share."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    chapter: str  # "ch01"
    number: int  # task N of the chapter, as in the prose, the stub's error and the test name
    name: str  # the function to write
    module: str  # where the reference lives
    summary: str  # one line for the stub's NotImplementedError

    @property
    def exercise_module(self) -> str:
        """The learner's file: exercises/<chapter>/<the reference file's name>."""
        return f"exercises.{self.chapter}.{self.module.rsplit('.', 1)[1]}"

    @property
    def message(self) -> str:
        return f"{self.chapter} task {self.number}: {self.summary}"


TASKS: dict[str, list[Task]] = {
    "ch01": [
        Task("ch01", 1, "rms_norm", "nanovllm.layers.norm", "RMSNorm, normalise by the root mean square"),
        Task("ch01", 2, "apply_rotary", "nanovllm.layers.rotary", "rotate q/k channel pairs by RoPE angles"),
        Task("ch01", 3, "silu_and_mul", "nanovllm.layers.activation", "the SwiGLU gate silu(gate) * up"),
        Task(
            "ch01",
            4,
            "causal_attention",
            "nanovllm.layers.attention",
            "causal attention with grouped KV heads",
        ),
        Task("ch01", 5, "sample_token", "chapters.ch01_naive.llm", "greedy or temperature sampling"),
        Task("ch01", 6, "naive_generate", "chapters.ch01_naive.llm", "the naive generation loop"),
    ],
    "ch02": [
        Task("ch02", 1, "write_kv", "chapters.ch02_kv_cache.kv_cache", "store new K/V at their positions"),
        Task("ch02", 2, "padded_causal_mask", "nanovllm.layers.attention", "the mask for a padded batch"),
        Task("ch02", 3, "right_pad", "chapters.ch02_kv_cache.llm", "batch prompts of different lengths"),
        Task("ch02", 4, "generate_batch", "chapters.ch02_kv_cache.llm", "prefill once, then decode from the cache"),
    ],
    "ch03": [
        Task("ch03", 1, "block_hash", "nanovllm.engine.block_manager", "the chained hash of a full block"),
        Task("ch03", 2, "BlockManager.allocate", "nanovllm.engine.block_manager", "allocate, sharing cached blocks"),
        Task("ch03", 3, "BlockManager.append_slot", "nanovllm.engine.block_manager", "grow by one token"),
        Task("ch03", 4, "BlockManager.free", "nanovllm.engine.block_manager", "release blocks, keep their hashes"),
        Task("ch03", 5, "slot_mapping", "nanovllm.engine.kv_cache", "where each token's K/V goes in the pool"),
        Task("ch03", 6, "gather_kv", "nanovllm.layers.attention", "read K/V through the block table"),
    ],
    "ch04": [
        Task("ch04", 1, "Scheduler.schedule", "nanovllm.engine.scheduler", "one step of iteration-level scheduling"),
        Task("ch04", 2, "Scheduler.preempt", "nanovllm.engine.scheduler", "free a sequence to recompute it later"),
        Task("ch04", 3, "apply_top_k", "nanovllm.layers.sampler", "keep the k most likely tokens"),
        Task("ch04", 4, "apply_top_p", "nanovllm.layers.sampler", "nucleus (top-p) filtering"),
        Task("ch04", 5, "apply_min_p", "nanovllm.layers.sampler", "drop tokens below min_p x the top one"),
    ],
    "ch05": [
        Task(
            "ch05",
            1,
            "online_softmax_update",
            "nanovllm.kernels.triton.decode_attention",
            "fold one tile into the running max, sum and output",
        ),
        Task(
            "ch05",
            2,
            "attend_blocks",
            "nanovllm.kernels.triton.decode_attention",
            "the decode loop over a context's tiles, read through the block table",
        ),
        Task(
            "ch05",
            3,
            "combine_splits",
            "nanovllm.kernels.triton.decode_attention",
            "merge split-K's partial softmaxes",
        ),
    ],
    "ch06": [
        Task("ch06", 1, "bucket_for", "nanovllm.engine.cuda_graphs", "the smallest captured batch size that fits"),
        Task("ch06", 2, "fill_decode_buffers", "nanovllm.engine.cuda_graphs", "a decode step into static buffers"),
        Task("ch06", 3, "split_qkv", "nanovllm.models.fused", "cut the fused projection into q, k and v"),
    ],
    "ch07": [
        Task("ch07", 1, "quantize_int8", "nanovllm.layers.quantization", "INT8 with one scale per output channel"),
        Task("ch07", 2, "quantize_int4", "nanovllm.layers.quantization", "INT4 per group, two values a byte"),
        Task("ch07", 3, "QuantLinear.forward", "nanovllm.layers.quantization", "a quantized linear layer's forward"),
    ],
}
