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

    @property
    def hint(self) -> str:
        """What a failing test of this task most likely means (HINTS below), or where to read more."""
        where = self.exercise_module.replace(".", "/") + ".py"
        return HINTS.get((self.chapter, self.number), f"read the docstring of {self.name} in {where}")


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
        Task("ch04", 6, "beam_step", "nanovllm.engine.beam_search", "one beam-search round: expand, score, prune"),
        Task("ch04", 7, "best_of", "nanovllm.engine.candidates", "the n most likely candidates, best first"),
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


# One line per task, from the pitfalls its worked solution lists (solutions/chNN.md, "Task N"), for the summary
# `pytest --impl=exercises` prints when a task's test fails: a tensor mismatch alone does not say what to look at.
HINTS: dict[tuple[str, int], str] = {
    ("ch01", 1): "RMSNorm is not LayerNorm: no mean subtracted, no bias; mean (not sum: that shrinks by sqrt(D)) of "
    "x**2 over the last dim with keepdim=True, in float32, cast back to x's dtype before the weight",
    ("ch01", 2): "rotate-half pairs channel j with j + D/2, not neighbours (0,1); and the sign: cat(-x2, x1), "
    "not cat(x2, -x1), which rotates backwards",
    ("ch01", 3): "the gate goes through SiLU: silu(gate) * up (sigmoid(gate) * up is GLU); "
    "no in-place ops on the inputs",
    ("ch01", 4): "k.repeat tiles the heads (0,1,0,1): query head h must read KV head h // group (repeat_interleave); "
    "mask with -inf before the softmax, keeping the lower triangle (tril, not triu)",
    ("ch01", 5): "temperature 0 is argmax; else softmax(logits / temperature), then torch.multinomial(probs, 1, "
    "generator=generator): the generator you are given, probabilities not logits",
    ("ch01", 6): "check max_tokens and EOS after appending the new token (before gives max_tokens + 1 or drops the "
    "EOS); pass the generator through to sample_token",
    ("ch02", 1): "k_cache[:, positions] writes every row's positions into every row: index with (rows, positions), "
    "rows = arange(B)[:, None] on k's device; a slice assumes all rows share positions (false from the first decode)",
    ("ch02", 2): "a query at position p sees slots s <= p (< hides each token from itself: NaN); True means attend; a "
    "square tril only fits a prefill from position 0",
    ("ch02", 3): "pad on the right; every row's positions run 0..T-1 (padding at position 0 or a repeated position "
    "writes its K/V over a real token's); pad_id must be a valid vocabulary id",
    ("ch02", 4): "at prefill sample each row at its last real token (lengths - 1), not hidden[:, -1]; generators[b] "
    "per row; cache.begin_step before every forward; never sample a finished row again",
    ("ch03", 1): "chain it: hash((prev_hash, tuple(token_ids))), so equal tokens after different prefixes get "
    "different keys; a tuple, not a list (unhashable) or a str (hashed differently per process)",
    ("ch03", 2): "claim the cache hits (an idle hit leaves the free list) before taking fresh blocks; call "
    "cached_prefix once; num_cached_tokens counts the hit blocks' tokens, never the whole prompt",
    ("ch03", 3): "a new block only when len(seq) > len(block_table) * block_size (>, not >=); a shared last block is "
    "copied on write: drop one reference (do not free it) and return (shared id, fresh id)",
    ("ch03", 4): "a block whose count reaches 0 goes to the back of the free list (append, not appendleft) and keeps "
    "its hash; never free a block already at 0",
    ("ch03", 5): "slot = block_table[p // block_size] * block_size + p % block_size: look the block up in the table "
    "and scale its id by the block size",
    ("ch03", 6): "cache[block_tables] is (B, max_blocks, block_size, Hkv, D): merge dims 1 and 2 only; with out "
    "given, write into it (index_select(..., out=out))",
    ("ch04", 1): "advance num_computed_tokens by the n scheduled tokens; allocate before computing a new sequence's n; "
    "append_slot for every decode; commit; preempt the newest; iterate over a copy of self.running",
    ("ch04", 2): "remove it from running, block_manager.free(seq) (keeps the hashes, resets num_computed_tokens), "
    "status WAITING, and waiting.appendleft: the front; keep its generated tokens",
    ("ch04", 3): "per-row k: k <= 0 means V, clamp to V, the threshold is the sorted row's column k - 1; remove "
    "logits < kth (<= also removes the k-th itself)",
    ("ch04", 4): "remove a token when the mass *before* it reaches top_p[:, None] (cumsum > top_p drops the token that "
    "crosses p); scatter the decision back through the sort order",
    ("ch04", 5): "compare probabilities, not logits: drop softmax probs < min_p[:, None] * the row's largest prob",
    ("ch04", 6): "every (token, logprob) of a beam's row is a candidate: cum = the beam's + logprob, parent = the "
    "beam's index; EOS completes it (finish_reason 'stop') unless ignore_eos; keep the old completed ones; sort both "
    "lists by beam_score, best first (sorted(..., reverse=True) keeps ties in order), and cut each to width",
    ("ch04", 7): "sort by cumulative_logprob, highest first, with a stable sort (ties keep the candidates' order), "
    "then keep n; do not change the dicts",
    ("ch05", 1): "m_new = maximum(m, max of the tile), not the tile's max alone; alpha = exp2(m - m_new) from the old "
    "m, rescaling both l and acc; tl.exp2, not tl.exp (the scores are in base 2); p.to(v.dtype) for tl.dot",
    ("ch05", 2): "look each position's block up in the table; load with mask=ok and make masked scores -inf (a masked "
    "K loads as 0, a score of 0); add kvh * D; start the loop at start, not 0",
    ("ch05", 3): "weight each split by exp2(m[j] - max m) before summing acc and l over axis 0, the splits; averaging "
    "acc[j] / l[j] weighs every split the same",
    ("ch06", 1): "the first bucket with size >= batch_size (> sends a batch of 4 to the bucket of 8), None when none "
    "holds it; the buckets need not be powers of 2",
    ("ch06", 2): "write into the buffers (buffers.slots[:n] = ..., never rebind them); zero the block tables past "
    "width; padding rows n:bucket get context_lens 1 and slot -1; leave rows past the bucket alone",
    ("ch06", 3): "q is Hq*D wide, k and v Hkv*D each, in that order: chunk(3) is right only without grouped-query "
    "attention; slice the last dimension, then view (B, T, heads, D)",
    ("ch07", 1): "one scale per output row: w.abs().amax(dim=1) / 127 (abs, and dim 1, not 0); torch.round before the "
    "cast, clamp to [-127, 127], guard all-zero rows (0 / 0 is NaN); scale shape (out,)",
    ("ch07", 2): "groups of consecutive inputs: view(out, in // group_size, group_size); round, clamp, add 8 in int16, "
    "then pack input 2j in the low nibble and 2j + 1 in the high one; guard all-zero groups",
    ("ch07", 3): "reshape x to (M, in) float32 contiguous first; the kernels add the bias, only the dequantized path "
    "adds self.bias; x @ dequantized().T; cast back to x.dtype; kernels only for CPU tensors",
}
