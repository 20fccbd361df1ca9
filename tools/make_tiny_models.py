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
    Gemma2Config,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
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
    # Mixtral: 4 experts, each token to 2 of them (weights renormalised), untied
    "tiny-mixtral": (
        MixtralConfig,
        dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
    ),
    # Qwen3-MoE: 8 experts of size 96, top-2 renormalised (norm_topk_prob, as Qwen3-30B-A3B); layer 1 of 3 is a
    # dense MLP of size 128 (mlp_only_layers); head_dim 32 though hidden / heads = 16
    "tiny-qwen3-moe": (
        Qwen3MoeConfig,
        dict(
            num_hidden_layers=3,
            num_key_value_heads=2,
            head_dim=32,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=96,
            norm_topk_prob=True,
            mlp_only_layers=[1],
            tie_word_embeddings=False,
        ),
    ),
    # Gemma: embeddings x sqrt(hidden), (1 + weight) norms, GeGLU (tanh gelu), multi-query, head_dim 24 (not 64 / 4),
    # tied embeddings
    "tiny-gemma": (GemmaConfig, dict(num_key_value_heads=1, head_dim=24, hidden_act="gelu_pytorch_tanh")),
    # Gemma 2: 3 layers, a window of 5 tokens (under a block, not a multiple of 4 or 16) on layers 0 and 2, soft caps
    # small enough to bend random weights' scores (the tokens change without it) and logits (up to 13 uncapped), a
    # query scale of 20 ** -0.5 (head_dim is 32); untied: tied, its random embeddings make it repeat the last token
    "tiny-gemma2": (
        Gemma2Config,
        dict(
            num_hidden_layers=3,
            num_key_value_heads=2,
            head_dim=32,
            sliding_window=5,
            query_pre_attn_scalar=20,
            attn_logit_softcapping=4.0,
            final_logit_softcapping=10.0,
            tie_word_embeddings=False,
        ),
    ),
    # Mistral with a window of 7 on every layer: sequences run far past it
    "tiny-mistral-window": (MistralConfig, dict(num_key_value_heads=2, tie_word_embeddings=False, sliding_window=7)),
    # GPT-2: learned positions (a table of 48: the longest oracle sequence, 44 tokens, fits), LayerNorm, GELU MLP,
    # biases, Conv1D weights, tied output; an odd vocabulary, larger than the tokenizer's (as real checkpoints pad it)
    "tiny-gpt2": (GPT2Config, dict(vocab_size=391, max_position_embeddings=48, n_inner=128)),
    # Phi-3: fused qkv_proj and gate_up_proj, GQA 4 -> 2, RoPE on half of each head (partial_rotary_factor), and
    # longrope (cos and sin scaled by its attention factor); the oracle's sequences (up to 44 tokens) stay under
    # original_max_position_embeddings: transformers' generate recomputes the whole cache with the long factors
    # when a sequence crosses it, which our engines do not (tests/test_models.py checks the crossing token by token)
    "tiny-phi3": (
        Phi3Config,
        dict(
            num_key_value_heads=2,
            max_position_embeddings=96,
            original_max_position_embeddings=48,
            partial_rotary_factor=0.5,
            rope_scaling={
                "rope_type": "longrope",
                "short_factor": [1.0, 1.1, 1.4, 2.0],
                "long_factor": [1.0, 2.5, 6.0, 16.0],
            },
            tie_word_embeddings=False,
        ),
    ),
    # Qwen2-MoE: bias on q, k, v; 6 experts of size 64, top-2 not renormalised (norm_topk_prob false, as
    # Qwen1.5-MoE-A2.7B), and a shared expert of size 96 behind a sigmoid gate
    "tiny-qwen2-moe": (
        Qwen2MoeConfig,
        dict(
            num_key_value_heads=2,
            num_experts=6,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=96,
            norm_topk_prob=False,
            tie_word_embeddings=False,
        ),
    ),
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
        if "norm" in name or name.endswith((".ln_1.weight", ".ln_2.weight", ".ln_f.weight")):  # GPT-2's LayerNorms
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
        attn = "eager" if config_cls is Gemma2Config else "sdpa"  # PyTorch's sdpa has no soft cap
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).float().eval()
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
