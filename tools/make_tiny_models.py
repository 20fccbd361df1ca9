"""Builds the tiny seeded test models (one per family) with transformers, and records transformers' outputs.

    python tools/make_tiny_models.py            # writes tests/models/tiny-*/ and tests/models/oracle.json

The weights are random but seeded; the oracle (greedy tokens and last-position logits)
is produced by transformers' own modeling code, never by ours.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from train_default_model import portable_tokenizer_config  # tools/ is on the path when run as a script
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

OUT = Path(__file__).resolve().parent.parent / "tests" / "models"
PROMPTS = ["Once upon a time", "The cat sat on the mat and", "KV caches make decoding fast because"]
MAX_NEW_TOKENS = 24

CORPUS = (
    """Once upon a time there was a little cat who sat on the mat.
The cat liked the sun, and the sun liked the cat. Every day they played in the garden.
A language model predicts the next token from the tokens before it.
Attention lets every token look at the tokens that came before, and the KV cache keeps their keys and values.
Decoding one token at a time is fast when nothing has to be computed twice.
"""
    * 4
)

COMMON = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

FAMILIES = {
    # plain Llama 2 shape: GQA 4 -> 2, untied embeddings
    "tiny-llama": (LlamaConfig, dict(num_key_value_heads=2, tie_word_embeddings=False)),
    # Llama 3: llama3 RoPE scaling, a large theta, tied embeddings, full multi-head attention
    "tiny-llama3": (
        LlamaConfig,
        dict(
            num_key_value_heads=4,
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    # Mistral: GQA 4 -> 1 (multi-query), sliding window wider than the context
    "tiny-mistral": (
        MistralConfig,
        dict(num_key_value_heads=1, tie_word_embeddings=False, sliding_window=4096),
    ),
    # Qwen2: bias on q, k, v; tied embeddings
    "tiny-qwen2": (Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=True)),
    # Qwen3: RMSNorm on q and k per head; head_dim 32 though hidden / heads = 16
    "tiny-qwen3": (Qwen3Config, dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)),
}


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=COMMON["vocab_size"],
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Seeded weights that exercise every piece: norm weights and biases are not left at 1 and 0."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if "norm" in name:
            p.copy_(1.0 + 0.2 * noise)
        elif name.endswith("bias"):
            p.copy_(0.1 * noise)
        else:
            p.copy_(0.25 * noise)


@torch.no_grad()
def oracle(model, tokenizer) -> dict:
    cases = []
    for text in PROMPTS:
        ids = tokenizer(text, return_tensors="pt").input_ids
        logits = model(ids).logits[0, -1].float()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=MAX_NEW_TOKENS,
            pad_token_id=0,
        )
        cases.append(
            {
                "prompt": text,
                "prompt_ids": ids[0].tolist(),
                "greedy": out[0, ids.shape[1] :].tolist(),
                "last_logits": [round(x, 6) for x in logits.tolist()],
            }
        )
    return {"max_new_tokens": MAX_NEW_TOKENS, "cases": cases}


def main() -> None:
    import transformers

    tokenizer = build_tokenizer()
    results = {"transformers_version": transformers.__version__, "models": {}}
    for seed, (name, (config_cls, extra)) in enumerate(FAMILIES.items()):
        config = config_cls(**{**COMMON, **extra})
        config.architectures = [config_cls.__name__.replace("Config", "ForCausalLM")]
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()
        randomize(model, seed)
        folder = OUT / name
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        portable_tokenizer_config(folder)  # loads in transformers 4 and 5
        results["models"][name] = oracle(model, tokenizer)
        print(name, sum(p.numel() for p in model.parameters()), "parameters")
    (OUT / "oracle.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
