"""The baseline a user would otherwise reach for: Hugging Face `transformers` `generate`, batched, greedy.

Batching method (stated in every result): requests are taken in arrival order in batches of
up to `batch_size`, left-padded to the batch's longest prompt, and each batch is generated
to its longest requested output with EOS ignored; every request is then cut to its own
length, so only requested tokens are counted (the extra steps of shorter requests are the
cost of static batching).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from benchmarks.engines import Engine, ForwardCounter, RunResult
from benchmarks.models import ResolvedModel
from benchmarks.workloads import Request

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TransformersEngine(Engine):
    name = "transformers"
    kind = "transformers"

    def __init__(
        self,
        model: ResolvedModel,
        device: str,
        dtype: str,
        batch_size: int | None = None,
        attn_implementation: str = "sdpa",
    ):
        import transformers
        from transformers import AutoModelForCausalLM, GenerationConfig

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        self.device, self.dtype = device, DTYPES[dtype]
        self.batch_size = batch_size or (64 if device.startswith("cuda") else 16)
        self.attn = attn_implementation
        self.model = (
            AutoModelForCausalLM.from_pretrained(
                str(model.hf_path), dtype=self.dtype, attn_implementation=attn_implementation
            )
            .to(device)
            .eval()
        )
        cfg = model.config
        pad = cfg.get("pad_token_id")
        self.pad_id = pad if isinstance(pad, int) else 0
        # No EOS at all: generation runs to max_new_tokens without masking any logit (greedy tokens stay
        # the model's argmax, as in the chapters' ignore_eos).
        self.gen_config = GenerationConfig(
            do_sample=False,
            eos_token_id=None,
            bos_token_id=None,
            pad_token_id=self.pad_id,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        self.model.generation_config = self.gen_config
        self.passes = ForwardCounter(self.model)
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        kv_heads = cfg.get("num_key_value_heads") or heads
        itemsize = torch.finfo(self.dtype).bits // 8
        self.kv_bytes_per_token = 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * itemsize

    def batches(self, requests: list[Request]) -> list[list[Request]]:
        return [requests[i : i + self.batch_size] for i in range(0, len(requests), self.batch_size)]

    @torch.inference_mode()
    def run(self, requests: list[Request]) -> RunResult:
        tokens: list[list[int]] = []
        start = self.passes.count
        t0 = time.perf_counter()
        for batch in self.batches(requests):
            width = max(len(r.prompt) for r in batch)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, r in enumerate(batch):  # left padding: the prompts end together, where generation starts
                ids[row, width - len(r.prompt) :] = torch.tensor(r.prompt)
                mask[row, width - len(r.prompt) :] = 1
            new = max(r.max_tokens for r in batch)
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                generation_config=self.gen_config,
                max_new_tokens=new,
                min_new_tokens=None,
            )
            out = out[:, width:].tolist()
            tokens.extend(row[: r.max_tokens] for row, r in zip(out, batch))
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return RunResult(time.perf_counter() - t0, tokens, forward_passes=self.passes.since(start))

    def kv_cache_bytes(self, requests: list[Request]) -> int | None:
        """Computed, not measured: transformers' dynamic cache grows to batch x (longest prompt + new tokens)."""
        return max(
            len(b) * (max(len(r.prompt) for r in b) + max(r.max_tokens for r in b)) * self.kv_bytes_per_token
            for b in self.batches(requests)
        )

    def info(self) -> dict[str, Any]:
        import transformers

        return {
            "kind": self.kind,
            "version": transformers.__version__,
            "batch_size": self.batch_size,
            "attn_implementation": self.attn,
            "kv_cache_bytes": "computed: batch x (prompt + output) per batch",
            "batching": "arrival order, batches of up to batch_size, left padding, each batch run to its "
            "longest output, only requested tokens counted",
        }
