"""Quality of a quantized model against the full-precision one: perplexity, KL divergence, top-1 agreement.

    python -m benchmarks.quality --model default --quantization int8,int4,int4-g64,int4-g128

Both models score the same held-out text, token by token (teacher forcing, one story at a time from <s>), the way
llama.cpp's `perplexity` tool reports its quantization types: perplexity of each model, the mean KL divergence
KL(fp32 || quantized) of the next-token distributions, and how often both put the same token first. The default
model's held-out text is its own held-out stream (tools/storygen.py, the stream its training held out).

The quantized model's linear layers are run as a decode step runs them (`rows_at_a_time`): a few rows at a time
through the quantized kernels, with their activation rounding, not as one dequantized matrix.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from nanovllm.layers.attention import causal_attention
from nanovllm.layers.quantization import QuantLinear, weight_bytes
from nanovllm.utils.loader import load_model

ROOT = Path(__file__).resolve().parent.parent
HELDOUT_SEED = 1000  # tools/train_default_model.py: held-out stories come from storygen stream seed + 1000


@dataclass
class Quality:
    scheme: str
    perplexity: float
    reference_perplexity: float
    mean_kl: float
    top1_agreement: float
    tokens: int
    weight_bytes: int
    reference_weight_bytes: int
    linear_bytes: int  # the quantized layers' weights as stored
    reference_linear_bytes: int  # the same layers in full precision

    @property
    def perplexity_change(self) -> float:
        return self.perplexity / self.reference_perplexity - 1


def heldout_texts(n: int = 64) -> list[str]:
    """The default model's held-out stories (the project's own generator; stream 1000, as its training used)."""
    sys.path.insert(0, str(ROOT / "tools"))
    import storygen

    return list(storygen.stories(n, seed=HELDOUT_SEED))


def attention(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return causal_attention(q, k, v)


class rows_at_a_time:
    """Within it, every QuantLinear takes its input `rows` rows at a time: the kernels' path, as in decoding."""

    def __init__(self, rows: int):
        self.rows = rows

    def __enter__(self):
        self.forward = QuantLinear.forward

        def forward(module, x):
            flat = x.reshape(-1, x.shape[-1])
            parts = [self.forward(module, flat[i : i + self.rows]) for i in range(0, len(flat), self.rows)]
            return torch.cat(parts).view(*x.shape[:-1], -1)

        QuantLinear.forward = forward

    def __exit__(self, *exc):
        QuantLinear.forward = self.forward


@torch.inference_mode()
def story_logits(model, ids: list[int]) -> torch.Tensor:
    x = torch.tensor([ids])
    return model.compute_logits(model(x, torch.arange(len(ids))[None], attention))[0]  # (T, V)


def linear_bytes(model) -> int:
    """Bytes of the layers quantization replaces (QuantLinear or Linear), at their stored size."""
    from nanovllm.layers.linear import Linear

    return sum(m.nbytes if isinstance(m, QuantLinear) else m.weight.nbytes for m in model.modules()
               if isinstance(m, (QuantLinear, Linear)))  # fmt: skip


def measure(model_path: str, schemes: list[str], texts: list[str], rows: int = 1) -> list[Quality]:
    """Each scheme against the full-precision model on the same texts."""
    reference = load_model(model_path)
    tok = reference.tokenizer
    stories = [tok.encode(t)[: reference.config.max_model_len] for t in texts]
    ref_logits = [story_logits(reference.model, ids) for ids in stories]
    results = []
    for scheme in schemes:
        quantized = load_model(model_path, quantization=scheme)
        nll = ref_nll = kl = agree = n = 0.0
        with rows_at_a_time(rows):
            for ids, ref in zip(stories, ref_logits):
                logits = story_logits(quantized.model, ids)
                targets = torch.tensor(ids[1:])
                logp, ref_logp = logits[:-1].log_softmax(-1), ref[:-1].log_softmax(-1)  # (T - 1, V)
                nll += float(F.nll_loss(logp, targets, reduction="sum"))
                ref_nll += float(F.nll_loss(ref_logp, targets, reduction="sum"))
                kl += float((ref_logp.exp() * (ref_logp - logp)).sum())
                agree += float((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
                n += len(targets)
        results.append(
            Quality(
                scheme,
                math.exp(nll / n),
                math.exp(ref_nll / n),
                kl / n,
                agree / n,
                int(n),
                weight_bytes(quantized.model),
                weight_bytes(reference.model),
                linear_bytes(quantized.model),
                linear_bytes(reference.model),
            )  # fmt: skip
        )
    return results


def table(results: list[Quality]) -> str:
    lines = [
        "| scheme | perplexity | fp32 | change | mean KL | top-1 agreement | linear weights | all weights |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.scheme} | {r.perplexity:.4f} | {r.reference_perplexity:.4f} | {100 * r.perplexity_change:+.2f}% | "
            f"{r.mean_kl:.5f} | {100 * r.top1_agreement:.2f}% | {r.linear_bytes / r.reference_linear_bytes:.3f}x | "
            f"{r.weight_bytes / r.reference_weight_bytes:.3f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="'default', a model folder, or a benchmark model name")
    p.add_argument("--quantization", default="int8,int4,int4-g64,int4-g128")
    p.add_argument("--texts", type=int, default=64, help="held-out stories to score")
    p.add_argument("--out", type=Path, default=None, help="write quality.json and quality.md here")
    args = p.parse_args(argv)
    path = args.model
    if path != "default" and not Path(path).exists():
        from benchmarks.models import resolve_model

        path = str(resolve_model(path).path)
    results = measure(path, args.quantization.split(","), heldout_texts(args.texts))
    print(table(results))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "quality.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
        (args.out / "quality.md").write_text(table(results) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
