"""The model zoo and its loaders: transformers still reproduces the stored oracle, stories260K matches llama2.c."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import FAMILIES, TINY_MODELS
from nanovllm.errors import ModelFormatError, UnsupportedArchitectureError
from nanovllm.utils.loader import load_model
from nanovllm.utils.tokenizer import IncrementalDetokenizer, incremental_text

pytestmark = pytest.mark.ch01


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_still_reproduces_the_stored_oracle(oracle, family):
    """The stored tokens learners check against really are what transformers generates."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY_MODELS / family, dtype=torch.float32).eval()
    data = oracle["models"][family]
    for case in data["cases"]:
        ids = torch.tensor([case["prompt_ids"]])
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=data["max_new_tokens"],
                pad_token_id=0,
            )
            logits = model(ids).logits[0, -1]
        assert out[0, ids.shape[1] :].tolist() == case["greedy"]
        # 1e-4: fp32 sums change in the last bits with the thread count and the CPU
        torch.testing.assert_close(logits, torch.tensor(case["last_logits"]), atol=1e-4, rtol=0)


def published_stories_text(readme: Path) -> str:
    """The llama2.c output quoted (indented) under 'Known output' in the model's README."""
    section = readme.read_text().split("## Known output", 1)[1]
    return next(line.strip() for line in section.splitlines() if line.startswith("    ") and line.strip())


def test_stories260k_reproduces_llama2c_published_text(stories260k):
    from chapters.ch01_naive import LLM, SamplingParams

    expected = published_stories_text(stories260k / "README.md")
    llm = LLM(str(stories260k))
    n = len(llm.tokenizer.encode(expected)) - 1  # tokens of the text, without BOS
    out = llm.generate([""], SamplingParams(temperature=0.0, max_tokens=n), use_tqdm=False)[0]
    assert out["text"] == expected


def test_llama2c_tokenizer_matches_sentencepiece(stories260k):
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(stories260k / "tok512.model"))
    tok = load_model(stories260k).tokenizer
    # llama2.c (and so our tokenizer) skips sentencepiece's whitespace normalisation: no runs of spaces here
    for text in ["Once upon a time", "Lily's mom said, 'Hi!'", "ünïcode → bytes 42", "a\nnew line"]:
        assert tok.encode(text) == [1, *sp.encode(text)], text
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))


class CountingTokenizer:
    """A tokenizer that records how many tokens each decode call reads."""

    def __init__(self, tok):
        self.tok, self.special_ids, self.calls = tok, tok.special_ids, []

    def decode(self, ids: list[int]) -> str:
        self.calls.append(len(ids))
        return self.tok.decode(ids)


# ids 0-2 print nothing in these tokenizers; 3-258 are llama2.c's raw bytes (characters split across tokens)
TOKEN_IDS = st.one_of(st.integers(0, 2), st.integers(3, 258), st.integers(0, 383))


@pytest.mark.parametrize("source", ["tests/models/tiny-llama", "default", "stories260K"])
@settings(max_examples=80, deadline=None)
@given(
    prompt=st.text(max_size=12),
    output=st.lists(TOKEN_IDS, min_size=1, max_size=60),
    chunks=st.lists(st.integers(1, 3), min_size=60, max_size=60),
)
def test_incremental_detokenizer_adds_up_to_the_decoded_continuation(source, prompt, output, chunks):
    """Token by token, in chunks of any size, the text equals decoding the whole output after the prompt
    (leading spaces, special tokens, characters split across byte tokens), and each decode reads a short window."""
    tok = TOKENIZERS[source]()
    prompt_ids = tok.encode(prompt)
    detok = IncrementalDetokenizer(CountingTokenizer(tok), prompt_ids)
    pieces, i = [], 0
    for size in chunks:
        if i >= len(output):
            break
        pieces.append(detok.add(output[i : i + size]))
        i += size
    pieces.append(detok.flush())
    assert "".join(pieces) == detok.text == incremental_text(tok, prompt_ids, output)
    # the prompt, then the last piece of text, up to 3 tokens of an unfinished character and the new ones
    assert max(detok.tokenizer.calls, default=0) <= len(prompt_ids) + 12


def _stories_tokenizer():
    from conftest import shared_path

    return load_model(shared_path("models/stories260K")).tokenizer


TOKENIZERS = {
    "tests/models/tiny-llama": lambda: load_model(TINY_MODELS / "tiny-llama").tokenizer,
    "default": lambda: load_model("default").tokenizer,
    "stories260K": _stories_tokenizer,
}


def test_llama2c_checkpoint_agrees_with_transformers_on_the_converted_weights(stories260k, tmp_path):
    """Our reader's permuted q/k rows give the same logits in transformers' Llama as in ours."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from chapters.ch01_naive.llm import no_cache_attention
    from nanovllm.utils.llama2c import read_llama2c

    config, state = read_llama2c(stories260k / "stories260K.bin")
    hf = AutoModelForCausalLM.from_config(LlamaConfig(**config)).eval()
    hf.load_state_dict(state, strict=False)
    ours = load_model(stories260k).model
    ids = torch.tensor([[1, 403, 407, 261, 378, 29]])
    with torch.no_grad():
        expected = hf(ids).logits[0]
        got = ours.compute_logits(ours(ids, torch.arange(6)[None], no_cache_attention))[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_loads_and_stays_close(dtype):
    from chapters.ch01_naive.llm import no_cache_attention

    full, half = load_model(TINY_MODELS / "tiny-qwen3"), load_model(TINY_MODELS / "tiny-qwen3", dtype=dtype)
    assert half.model.lm_head.weight.dtype == getattr(torch, dtype)
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    pos = torch.arange(5)[None]
    with torch.no_grad():
        a = full.model.compute_logits(full.model(ids, pos, no_cache_attention))
        b = half.model.compute_logits(half.model(ids, pos, no_cache_attention))
    assert (a - b).abs().max() < 0.15 * a.abs().max()


# ---- clear errors for bad model folders -------------------------------------------------------------


def copy_model(tmp_path: Path, name: str = "tiny-llama") -> Path:
    dest = tmp_path / name
    shutil.copytree(TINY_MODELS / name, dest)
    return dest


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "nope")


@pytest.mark.parametrize(
    ("device", "message"),
    [("tpu", "not a torch device"), ("mps", "runs on 'cpu' or 'cuda'")]
    + ([] if torch.cuda.is_available() else [("cuda", "not available"), ("cuda:1", "not available")]),
)
def test_unusable_device_is_a_clear_error(device, message):
    with pytest.raises(ValueError, match=message):
        load_model(TINY_MODELS / "tiny-llama", device=device)


@pytest.mark.parametrize("block_size", [0, -16, 2.5])
def test_bad_block_size_is_a_clear_error(block_size):
    from chapters.ch03_paged_kv import LLM as Chapter3
    from nanovllm import LLM

    for engine in (Chapter3, LLM):
        with pytest.raises(ValueError, match="block_size must be an integer >= 1"):
            engine(str(TINY_MODELS / "tiny-llama"), block_size=block_size)


def test_folder_without_config(tmp_path):
    folder = copy_model(tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(ModelFormatError, match="config.json"):
        load_model(folder)


def test_malformed_config(tmp_path):
    folder = copy_model(tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        load_model(folder)


def test_missing_weights(tmp_path):
    folder = copy_model(tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelFormatError, match="no \\*.safetensors"):
        load_model(folder)


def test_unreadable_weights(tmp_path):
    folder = copy_model(tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelFormatError, match="unreadable safetensors"):
        load_model(folder)


def test_shape_mismatch_names_the_tensor(tmp_path):
    folder = copy_model(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match=r"mlp\.\w+_proj\.weight' has shape \(\d+, \d+\), the config implies"):
        load_model(folder)


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_model(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ModelFormatError, match="missing tensors.*layers.1.mlp.up_proj"):
        load_model(folder)


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    folder = copy_model(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="GPTNeoXForCausalLM.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        load_model(folder)


def test_truncated_llama2c_checkpoint(stories260k, tmp_path):
    for name in ("stories260K.bin", "tok512.bin"):
        shutil.copy(stories260k / name, tmp_path / name)
    data = (tmp_path / "stories260K.bin").read_bytes()
    (tmp_path / "stories260K.bin").write_bytes(data[:-100])
    with pytest.raises(ModelFormatError, match="header implies"):
        load_model(tmp_path)
