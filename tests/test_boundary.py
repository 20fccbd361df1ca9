"""The engine's boundary: every bad input fails at once, with the exception and parameter it names, in every chapter
and the command line, and leaves the engine as it was; bf16 RoPE stays fp32; the CPU KV pool fits in memory."""

from __future__ import annotations

import importlib
import json
import math
import re
import shutil

import pytest
import torch

from conftest import TINY_MODELS
from nanovllm.cli import main
from nanovllm.config import ModelConfig
from nanovllm.engine import kv_cache
from nanovllm.engine.io import check_engine_args
from nanovllm.engine.kv_cache import KVPool, pool_for_model
from nanovllm.errors import ModelFormatError, PromptTooLongError
from nanovllm.layers.rotary import rope_cos_sin, rope_inv_freq
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.loader import load_model

pytestmark = pytest.mark.ch04
MODEL = str(TINY_MODELS / "tiny-llama")
CHAPTERS = {
    "ch01": "chapters.ch01_naive",
    "ch02": "chapters.ch02_kv_cache",
    "ch03": "chapters.ch03_paged_kv",
    "ch04": "chapters.ch04_continuous_batching",
    "ch07": "chapters.ch07_quantization",  # the final engine, with the options chapters 6 and 7 add
}
GOOD_PROMPT, GOOD = "Once upon a time", SamplingParams(temperature=0.0, max_tokens=8)


def engine_class(chapter: str):
    return importlib.import_module(CHAPTERS[chapter]).LLM


class Engines:
    """One engine per chapter for the whole module, built on first use, with its lone run of the good request."""

    def __init__(self):
        self.built: dict[str, tuple[object, list[int]]] = {}

    def __call__(self, chapter: str) -> tuple[object, list[int]]:
        if chapter not in self.built:
            llm = engine_class(chapter)(MODEL)
            lone = llm.generate([GOOD_PROMPT], GOOD, use_tqdm=False)[0]["token_ids"]  # a fresh engine's tokens
            assert len(lone) == GOOD.max_tokens
            self.built[chapter] = (llm, lone)
        return self.built[chapter]


@pytest.fixture(scope="module")
def engines() -> Engines:
    return Engines()


def assert_still_good(llm, lone: list[int]) -> None:
    """After a refused request the engine holds nothing of it and gives the good request its lone-run tokens."""
    if hasattr(llm, "has_unfinished"):
        assert not llm.has_unfinished()
    assert llm.generate([GOOD_PROMPT], GOOD, use_tqdm=False)[0]["token_ids"] == lone


def raises(exc: type[Exception], name: str):
    return pytest.raises(exc, match=re.escape(name))


# ---- 5: SamplingParams refuses what would crash the sampler; a tiny temperature is greedy --------------------

BAD_SAMPLING = [
    ("temperature", -1.0),
    ("temperature", math.inf),
    ("temperature", math.nan),
    ("temperature", 1e5),
    ("temperature", 10**400),
    ("temperature", "hot"),
    ("temperature", None),
    ("max_tokens", 0),
    ("max_tokens", 2**31),
    ("max_tokens", 8.0),
    ("max_tokens", True),
    ("min_tokens", 2**31),
    ("min_tokens", -1),
    ("seed", -1),
    ("seed", 2**64),
    ("seed", 2**70),
    ("seed", 1.0),
    ("seed", "7"),
    ("top_k", -2),
    ("top_k", 2**31),
    ("top_k", 2**63),
    ("top_k", 5.0),
    ("top_p", 0.0),
    ("top_p", math.nan),
    ("top_p", math.inf),
    ("min_p", -0.1),
    ("min_p", math.nan),
    ("repetition_penalty", 1e-40),
    ("repetition_penalty", 0.001),
    ("repetition_penalty", 1e3),
    ("repetition_penalty", math.inf),
    ("repetition_penalty", math.nan),
    ("repetition_penalty", -1.0),
    ("presence_penalty", math.inf),
    ("presence_penalty", -math.inf),
    ("frequency_penalty", math.nan),
    ("stop", 5),
    ("stop", [5]),
    ("stop", [""]),
    ("stop", b"end"),
    ("stop_token_ids", 5),
    ("stop_token_ids", ["1"]),
    ("stop_token_ids", [2**31]),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", "12"),
    ("ignore_eos", "no"),
    ("include_stop_str_in_output", 1),
]


@pytest.mark.parametrize(("field", "value"), BAD_SAMPLING, ids=lambda v: repr(v)[:20])
def test_bad_sampling_parameter_is_a_value_error_naming_it(field, value):
    with raises(ValueError, field):
        SamplingParams(**{field: value})


def test_tiny_temperatures_are_greedy_and_none_means_no_stops():
    for t in (0.0, 1e-40, 1e-6, 9.9e-6):
        assert SamplingParams(temperature=t).greedy, t
    assert not SamplingParams(temperature=1e-5).greedy
    params = SamplingParams(stop=None, stop_token_ids=None, seed=2**64 - 1, top_k=2**31 - 1)
    assert params.stop == [] and params.stop_token_ids == []


@pytest.mark.parametrize("chapter", list(CHAPTERS))
def test_a_temperature_too_small_to_divide_by_samples_greedily(engines, chapter):
    llm, lone = engines(chapter)
    for t in (1e-40, 1e-6):
        params = SamplingParams(temperature=t, max_tokens=GOOD.max_tokens)
        assert llm.generate([GOOD_PROMPT], params, use_tqdm=False)[0]["token_ids"] == lone, t


# ---- 6: a text prompt whose tokens the model does not have ----------------------------------------------------


@pytest.mark.parametrize("chapter", list(CHAPTERS))
def test_text_prompt_with_tokens_past_the_models_vocabulary(chapter):
    # tiny-qwen2's tokenizer has 385 tokens (an added <|endoftext|> is id 384), its embedding 384 rows
    llm = engine_class(chapter)(str(TINY_MODELS / "tiny-qwen2"))
    assert llm.tokenizer.encode("hi <|endoftext|>")[-1] == 384 == llm.config.vocab_size
    with raises(ValueError, "outside the vocabulary [0, 384)"):
        llm.generate(["hi", "hi <|endoftext|>"], GOOD, use_tqdm=False)
    if hasattr(llm, "add_request"):
        with raises(ValueError, "outside the vocabulary"):
            llm.add_request("hi <|endoftext|>", GOOD)
        assert not llm.has_unfinished()
    assert len(llm.generate(["hi"], GOOD, use_tqdm=False)[0]["token_ids"]) == GOOD.max_tokens


# ---- 8: engine arguments, in every chapter ------------------------------------------------------------------

COMMON_ARGS = [
    ({"model": None}, TypeError, "model"),
    ({"model": 5}, TypeError, "model"),
    ({"dtype": torch.int32}, ValueError, "dtype"),
    ({"dtype": torch.float8_e4m3fn}, ValueError, "dtype"),
    ({"dtype": torch.float64}, ValueError, "dtype"),
    ({"dtype": "int8"}, ValueError, "dtype"),
    ({"dtype": 16}, TypeError, "dtype"),
    ({"device": "meta"}, ValueError, "device"),
    ({"device": "cuda:x"}, ValueError, "device"),
    ({"device": "tpu"}, ValueError, "device"),
    ({"device": 0}, TypeError, "device"),
    ({"max_model_len": 0}, ValueError, "max_model_len"),
    ({"max_model_len": -1}, ValueError, "max_model_len"),
    ({"max_model_len": 2.5}, ValueError, "max_model_len"),
    ({"max_model_len": "64"}, TypeError, "max_model_len"),
    ({"max_model_len": True}, TypeError, "max_model_len"),
    ({"seed": -1}, ValueError, "seed"),
    ({"seed": 2**64}, ValueError, "seed"),
    ({"seed": 1.5}, ValueError, "seed"),
    ({"seed": "0"}, TypeError, "seed"),
    ({"seed": True}, TypeError, "seed"),
    ({"seed": None}, TypeError, "seed"),
]
SEQS_ARGS = [
    ({"max_num_seqs": 0}, ValueError, "max_num_seqs"),
    ({"max_num_seqs": 2.5}, ValueError, "max_num_seqs"),
    ({"max_num_seqs": "16"}, TypeError, "max_num_seqs"),
    ({"max_num_seqs": None}, TypeError, "max_num_seqs"),
    ({"kv_cache_memory": "1GB"}, TypeError, "kv_cache_memory"),
    ({"kv_cache_memory": 0}, ValueError, "kv_cache_memory"),
    ({"kv_cache_memory": -5}, ValueError, "kv_cache_memory"),
    ({"kv_cache_memory": math.nan}, ValueError, "kv_cache_memory"),
    ({"kv_cache_memory": math.inf}, ValueError, "kv_cache_memory"),
    ({"kv_cache_memory": True}, TypeError, "kv_cache_memory"),
]
PAGED_ARGS = [
    ({"block_size": 0}, ValueError, "block_size"),
    ({"block_size": 2.5}, ValueError, "block_size"),
    ({"block_size": "16"}, TypeError, "block_size"),
    ({"block_size": True}, TypeError, "block_size"),
    ({"gpu_memory_utilization": 0}, ValueError, "gpu_memory_utilization"),
    ({"gpu_memory_utilization": 1.5}, ValueError, "gpu_memory_utilization"),
    ({"gpu_memory_utilization": math.nan}, ValueError, "gpu_memory_utilization"),
    ({"gpu_memory_utilization": "0.9"}, TypeError, "gpu_memory_utilization"),
    ({"enable_prefix_caching": "yes"}, TypeError, "enable_prefix_caching"),
    ({"enable_prefix_caching": 1}, TypeError, "enable_prefix_caching"),
]
ENGINE_ARGS = [
    ({"max_num_batched_tokens": 0}, ValueError, "max_num_batched_tokens"),
    ({"max_num_batched_tokens": 1.5}, ValueError, "max_num_batched_tokens"),
    ({"max_num_batched_tokens": "512"}, TypeError, "max_num_batched_tokens"),
    ({"enable_chunked_prefill": "no"}, TypeError, "enable_chunked_prefill"),
    ({"enable_chunked_prefill": None}, TypeError, "enable_chunked_prefill"),
    ({"attention_backend": 5}, TypeError, "attention_backend"),
    ({"attention_backend": "nope"}, ValueError, "attention_backend"),
]
FINAL_ENGINE_ARGS = [  # the options chapters 6 and 7 add to the engine
    ({"enforce_eager": "yes"}, TypeError, "enforce_eager"),
    ({"enforce_eager": 0}, TypeError, "enforce_eager"),
    ({"fuse_projections": 1}, TypeError, "fuse_projections"),
    ({"fuse_projections": None}, TypeError, "fuse_projections"),
    ({"linear_kernel": "blas"}, ValueError, "linear_kernel"),
    ({"linear_kernel": True}, TypeError, "linear_kernel"),
    ({"quantization": "int3"}, ValueError, "quantization"),
    ({"quantization": 8}, ValueError, "quantization"),
    ({"quantize_lm_head": "no"}, TypeError, "quantize_lm_head"),
]
CONSTRUCTOR_CASES = (
    [("ch01", *case) for case in COMMON_ARGS]
    + [(ch, *case) for ch in ("ch02", "ch03", "ch04") for case in COMMON_ARGS + SEQS_ARGS]
    + [(ch, *case) for ch in ("ch03", "ch04") for case in PAGED_ARGS]
    + [("ch04", *case) for case in ENGINE_ARGS]
    + [("ch07", *case) for case in ENGINE_ARGS + FINAL_ENGINE_ARGS]
)


@pytest.mark.parametrize(("chapter", "kwargs", "exc", "name"), CONSTRUCTOR_CASES, ids=lambda v: repr(v)[:30])
def test_bad_engine_argument_fails_at_construction_naming_it(chapter, kwargs, exc, name):
    args = {"model": MODEL, **kwargs}
    with raises(exc, name):
        engine_class(chapter)(**args)


def test_check_engine_args_accepts_the_defaults_and_knows_its_arguments():
    check_engine_args(
        dtype=None,
        device="cpu",
        max_model_len=None,
        seed=2**64 - 1,
        max_num_seqs=1,
        max_num_batched_tokens=512,
        block_size=16,
        kv_cache_memory=2e8,  # the benchmark's options are floats
        gpu_memory_utilization=1,
        enable_prefix_caching=False,
        enable_chunked_prefill=True,
        attention_backend="auto",
    )
    check_engine_args(dtype=torch.bfloat16, device=torch.device("cpu"), kv_cache_memory=None)
    with raises(TypeError, "max_num_sequences"):
        check_engine_args(max_num_sequences=4)


# ---- 8: bad prompts and bad params on a live engine, which stays as it was ----------------------------------

BAD_PROMPTS = [
    (None, TypeError, "prompts"),
    (5, TypeError, "prompts"),
    (3.5, TypeError, "prompts"),
    (b"Once upon", TypeError, "prompts"),
    (bytearray(b"Once"), TypeError, "prompts"),
    ({"prompt": "Once"}, TypeError, "prompts"),
    ({1, 2}, TypeError, "prompts"),
    ([1, "a"], TypeError, "prompt"),
    (["a", 1], TypeError, "prompt"),
    (["a", None], TypeError, "prompt"),
    ([b"a"], TypeError, "prompt"),
    ([[]], ValueError, "empty prompt"),
    ([[[]]], TypeError, "prompt"),
    ([[1, 2.0]], TypeError, "prompt"),
    ([[1, True]], TypeError, "prompt"),
    ([[1, 99999]], ValueError, "prompt token ids"),
    ([[-1]], ValueError, "prompt token ids"),
    ([[5] * 300], PromptTooLongError, "prompt"),
]
BAD_PARAMS = [
    (5, TypeError, "sampling_params"),
    ({"temperature": 0}, TypeError, "sampling_params"),
    ([5], TypeError, "sampling_params"),
    ([GOOD, GOOD], ValueError, "SamplingParams"),
    (SamplingParams(stop_token_ids=[99999]), ValueError, "stop_token_ids"),
]
GENERATE_CASES = [
    (ch, prompts, params, exc, name)
    for ch in ("ch02", "ch03", "ch04")
    for prompts, params, exc, name in [(p, GOOD, e, n) for p, e, n in BAD_PROMPTS]
    + [([GOOD_PROMPT], p, e, n) for p, e, n in BAD_PARAMS]
] + [
    (ch, [GOOD_PROMPT], SamplingParams(top_k=5), ValueError, "top_k")  # chapter 4 brings top_k
    for ch in ("ch02", "ch03")
]


@pytest.mark.parametrize(("chapter", "prompts", "params", "exc", "name"), GENERATE_CASES, ids=lambda v: repr(v)[:30])
def test_bad_request_fails_naming_it_and_the_engine_carries_on(engines, chapter, prompts, params, exc, name):
    llm, lone = engines(chapter)
    with raises(exc, name):
        llm.generate(prompts, params, use_tqdm=False)
    assert_still_good(llm, lone)


ADD_REQUEST_CASES = [
    (None, TypeError, "prompt"),
    (b"Once", TypeError, "prompt"),
    ({"prompt": "Once"}, TypeError, "prompt"),
    (["Once", "upon"], TypeError, "prompt"),
    ([1, "a"], TypeError, "prompt"),
    ([[1]], TypeError, "prompt"),
    ([], ValueError, "empty prompt"),
    ([99999], ValueError, "prompt token ids"),
    ([5] * 300, PromptTooLongError, "prompt"),
    (5, TypeError, "prompt"),  # last: add_request([5]) would queue a one-token prompt
]


@pytest.mark.parametrize(("prompt", "exc", "name"), ADD_REQUEST_CASES, ids=lambda v: repr(v)[:20])
def test_bad_add_request_queues_nothing(engines, prompt, exc, name):
    llm, lone = engines("ch04")
    with raises(exc, name):
        llm.add_request(prompt, GOOD)
    assert_still_good(llm, lone)


# ---- the command line: exit status 2 and one line naming the parameter ---------------------------------------

CLI_CASES = [
    (["--seed", str(2**64)], "seed"),
    (["--seed", "-1"], "seed"),
    (["--temperature", "inf"], "temperature"),
    (["--temperature", "nan"], "temperature"),
    (["--temperature", "-1"], "temperature"),
    (["--top-k", str(2**63)], "top_k"),
    (["--top-k", "-5"], "top_k"),
    (["--top-p", "0"], "top_p"),
    (["--top-p", "1.5"], "top_p"),
    (["--max-tokens", "0"], "max_tokens"),
    (["--max-tokens", str(2**31)], "max_tokens"),
    (["--dtype", "int32"], "dtype"),
    (["--dtype", "float8_e4m3fn"], "dtype"),
    (["--device", "meta"], "device"),
    (["--device", "cuda:x"], "device"),
    (["--device", "tpu"], "device"),
]


@pytest.mark.parametrize(("options", "name"), CLI_CASES, ids=lambda v: repr(v)[:30])
def test_cli_bad_option_is_one_line_naming_it(capsys, options, name):
    assert main(["generate", "Once", "--model", MODEL, *options]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("nanovllm: error: ") and err.count("\n") == 1 and name in err, err


# ---- 8: generation_config.json that cannot be read -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [("{not json", "not valid JSON"), ("[2]", "JSON object"), ('{"eos_token_id": "x"}', "eos_token_id")],
)
def test_bad_generation_config_names_the_file(tmp_path, text, message):
    folder = tmp_path / "tiny-llama"
    shutil.copytree(MODEL, folder)
    (folder / "generation_config.json").write_text(text)
    with pytest.raises(ModelFormatError, match=re.escape(str(folder / "generation_config.json")) + ".*" + message):
        load_model(folder)


def shard(folder, extra: dict | None = None) -> None:
    """Split the folder's model.safetensors in two files with an index, as big checkpoints come."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, folder / file)
        weight_map |= {n: file for n in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for file, more in (extra or {}).items():
        save_file(more, folder / file)


def test_a_sharded_checkpoint_reads_the_files_its_index_names(tmp_path):
    """Shards and an index: only the files the index maps tensors to are read (a repository may ship other weights
    beside them: Mistral's consolidated.safetensors, whose names made the folder unreadable)."""
    from nanovllm import LLM

    folder = tmp_path / "sharded"
    shutil.copytree(MODEL, folder)
    shard(folder, {"consolidated.safetensors": {"layers.0.attention.wq.weight": torch.zeros(4, 4)}})
    greedy = SamplingParams(temperature=0, max_tokens=8)
    want = LLM(MODEL).generate(["Once upon"], greedy, use_tqdm=False)[0]["token_ids"]
    assert LLM(str(folder)).generate(["Once upon"], greedy, use_tqdm=False)[0]["token_ids"] == want
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelFormatError, match="index.json maps tensors to model-00002-of-00002.safetensors, which is"):
        load_model(folder)
    (folder / "model.safetensors.index.json").write_text('{"weights": {}}')
    with pytest.raises(ModelFormatError, match="not a safetensors index"):
        load_model(folder)


def test_bad_eos_token_id_in_config_is_a_model_format_error(tmp_path):
    folder = tmp_path / "tiny-llama"
    shutil.copytree(MODEL, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "eos_token_id": [2, "3"]}))
    with pytest.raises(ModelFormatError, match="config.json.*eos_token_id"):
        load_model(folder)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_key_value_heads", 0),  # 0 once read as "absent", then failed on a weight's shape
        ("head_dim", "16"),
        ("max_position_embeddings", 0),  # once blamed the KV budget
        ("rms_norm_eps", "x"),  # once float()'s own message, naming nothing
        ("rms_norm_eps", -1e-6),
        ("rope_theta", float("inf")),
    ],
)
def test_a_bad_number_in_config_is_named(tmp_path, field, value):
    folder = tmp_path / "tiny-llama"
    shutil.copytree(MODEL, folder)
    cfg = json.loads((folder / "config.json").read_text())
    if field == "rope_theta":  # transformers >= 5 keeps it in rope_parameters
        cfg["rope_parameters"] = {**cfg.get("rope_parameters", {}), "rope_theta": value}
    (folder / "config.json").write_text(json.dumps({**cfg, field: value}))
    with pytest.raises(ModelFormatError, match=f"config.json: '{field}' must be a positive"):
        load_model(folder)


# ---- 3: RoPE tables stay fp32 in half precision --------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keeps_rope_in_float32(dtype):
    model = load_model(MODEL, dtype=dtype).model
    cfg = model.config
    exact = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    assert model.lm_head.weight.dtype == dtype and model.inv_freq.dtype == torch.float32
    assert torch.equal(model.inv_freq, exact)
    model.to(dtype)  # casting the model again keeps it too
    assert model.inv_freq.dtype == torch.float32 and torch.equal(model.inv_freq, exact)
    # far into the context cos and sin are the fp32 ones, rounded once at the end
    positions = torch.arange(200, 256)[None]
    cos, sin = rope_cos_sin(positions, model.inv_freq, dtype)
    cos32, sin32 = rope_cos_sin(positions, exact, torch.float32)
    assert torch.equal(cos, cos32.to(dtype)) and torch.equal(sin, sin32.to(dtype))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_logit_error_does_not_grow_with_position(dtype):
    """With bf16/fp16 frequencies the error against fp32 at positions 200-255 was 1.9x/3.1x that at 0-63 on
    tiny-llama; with fp32 ones it is about 1.3x (only the weights' rounding)."""
    from chapters.ch01_naive.llm import no_cache_attention

    full, half = load_model(MODEL).model, load_model(MODEL, dtype=dtype).model
    ids = torch.randint(3, 384, (4, 256), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(256).expand(4, 256)
    with torch.no_grad():
        want = full.compute_logits(full(ids, positions, no_cache_attention))
        got = half.compute_logits(half(ids, positions, no_cache_attention))
    error = (got - want).abs().mean(-1) / want.abs().mean(-1)  # (4, 256)
    early, late = error[:, :64].mean(), error[:, 200:].mean()
    assert late < 1.5 * early, (float(early), float(late))


# ---- 11: the default CPU KV pool fits in the memory there is -------------------------------------------------


def tiny_config() -> ModelConfig:
    return ModelConfig.from_folder(MODEL)  # 2 layers, 2 KV heads of 16: 512 bytes a token in fp32


def test_default_cpu_kv_budget_is_capped_by_available_memory(monkeypatch):
    cfg, per_block = tiny_config(), KVPool.bytes_per_block(2, 16, 2, 16, torch.float32)
    monkeypatch.setattr(kv_cache, "available_memory", lambda: 2**50)  # plenty: the default, 16 x 256 tokens
    assert pool_for_model(cfg, torch.float32, "cpu", 16, None, 0.9, 16 * 256, max_model_len=256).num_tokens == 4096
    monkeypatch.setattr(kv_cache, "available_memory", lambda: 4 * 2**20)  # a quarter of it is 1 MiB: 2048 tokens
    pool = pool_for_model(cfg, torch.float32, "cpu", 16, None, 0.9, 16 * 256, max_model_len=256)
    assert pool.nbytes == 2**20 and pool.num_tokens == 2048
    # an explicit budget is the caller's: no cap
    pool = pool_for_model(cfg, torch.float32, "cpu", 16, 3 * 2**20, 0.9, 16 * 256, max_model_len=256)
    assert pool.nbytes == 3 * 2**20 // per_block * per_block
    monkeypatch.setattr(kv_cache, "available_memory", lambda: None)  # cannot tell: the default
    assert pool_for_model(cfg, torch.float32, "cpu", 16, None, 0.9, 16 * 256).num_tokens == 4096


def test_a_long_context_model_gets_a_quarter_of_available_memory_not_100_gib(monkeypatch):
    # a 1B-class model with a 128k context: 16 x 128k tokens of fp32 KV would be 128 GiB
    cfg = ModelConfig("LlamaForCausalLM", 32000, 2048, 8192, 16, 32, 8, 64, max_position_embeddings=131072)
    monkeypatch.setattr(kv_cache, "available_memory", lambda: 64 * 2**30)
    pool = pool_for_model(cfg, torch.float32, "meta", 16, None, 0.9, 16 * 131072, max_model_len=131072)
    assert pool.nbytes == 16 * 2**30  # room for two sequences of the full context; meta tensors are never allocated


def test_no_room_for_one_sequence_says_what_to_set(monkeypatch):
    from chapters.ch03_paged_kv import LLM

    monkeypatch.setattr(kv_cache, "available_memory", lambda: 256 * 2**10)  # 64 KiB budget; 256 tokens need 128
    with pytest.raises(ValueError, match="max_model_len=256.*max_model_len.*kv_cache_memory"):
        pool_for_model(tiny_config(), torch.float32, "cpu", 16, None, 0.9, 16 * 256, max_model_len=256)
    with pytest.raises(ValueError, match="max_model_len=256.*kv_cache_memory"):
        LLM(MODEL)
    assert LLM(MODEL, max_model_len=64).pool.num_tokens == 128  # one 64-token sequence fits in 64 KiB
    assert LLM(MODEL, kv_cache_memory=2**20).pool.nbytes == 2**20  # or name the budget


def test_engine_with_no_room_for_one_sequence_says_what_to_set(monkeypatch):
    monkeypatch.setattr(kv_cache, "available_memory", lambda: 256 * 2**10)
    with pytest.raises(ValueError, match="max_model_len=256.*kv_cache_memory"):
        engine_class("ch04")(MODEL)
    assert engine_class("ch04")(MODEL, max_model_len=64).pool.num_tokens == 128


@pytest.mark.parametrize("chapter", ["ch01", "ch04", "nanovllm"])
def test_a_context_longer_than_the_models_is_refused(chapter):
    """max_model_len past max_position_embeddings (256 in tiny-llama's config.json) is an error, not a silent clamp;
    at or below it, it is the context the engine runs."""
    llm_class = engine_class(chapter) if chapter != "nanovllm" else importlib.import_module("nanovllm").LLM
    with open(TINY_MODELS / "tiny-llama" / "config.json") as f:
        model_context = json.load(f)["max_position_embeddings"]
    with pytest.raises(ValueError, match=f"max_model_len={model_context + 1} .* context of {model_context} tokens"):
        llm_class(MODEL, max_model_len=model_context + 1)
    assert llm_class(MODEL, max_model_len=model_context).max_model_len == model_context
    assert llm_class(MODEL, max_model_len=32).max_model_len == 32
    assert llm_class(MODEL).max_model_len == model_context


def test_a_hub_id_is_downloaded_once_and_loaded(monkeypatch):
    """LLM('org/name') where no such path exists: the model comes from the Hugging Face hub's cache (downloaded
    there once). No hub in tests: snapshot_download is replaced by one that hands back a local folder."""
    import huggingface_hub

    from nanovllm import LLM

    asked = []

    def snapshot_download(repo_id, allow_patterns=None):
        asked.append((repo_id, allow_patterns))
        if repo_id == "someone/missing":
            raise huggingface_hub.errors.RepositoryNotFoundError("404 Client Error: Repository Not Found")
        return MODEL

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    greedy = SamplingParams(temperature=0, max_tokens=6)
    want = LLM(MODEL).generate(["Once upon"], greedy, use_tqdm=False)[0]["token_ids"]
    assert LLM("someone/tiny-llama").generate(["Once upon"], greedy, use_tqdm=False)[0]["token_ids"] == want
    assert asked[0][0] == "someone/tiny-llama" and "*.safetensors" in asked[0][1] and "*.bin" not in asked[0][1]
    assert len(asked) == 1  # once, though the engine and its loader both resolve the name
    two_ranks = LLM("someone/tiny-llama", tensor_parallel_size=2)  # the workers, not patched, get the local folder
    assert two_ranks.generate(["Once upon"], greedy, use_tqdm=False)[0]["token_ids"] == want and len(asked) == 2
    two_ranks.shutdown()
    with pytest.raises(FileNotFoundError, match="'someone/missing' is no file or folder here, and the Hugging Face"):
        LLM("someone/missing")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        LLM("not/a/hub/id")  # two slashes: a path, never the hub
    assert len(asked) == 3
