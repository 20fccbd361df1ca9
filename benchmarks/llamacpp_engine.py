"""Optional engine: llama.cpp through `llama-cpp-python`, on the same weights converted to GGUF.

The Hugging Face -> GGUF converter ships in llama-cpp-python's source distribution
(vendor/llama.cpp/convert_hf_to_gguf.py, with gguf-py), not in its wheel: point
$LLAMA_CPP_CONVERTER at it. The converter wants a tokenizer it knows; the benchmark feeds
token ids, so a stand-in sentencepiece model (one piece per id) is written beside the
weights in a staging folder. Requests are served one at a time, streamed, greedy.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.engines import Engine, EngineUnavailable, RunResult
from benchmarks.models import ResolvedModel, cache_dir
from benchmarks.workloads import Request

OUTTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
INSTALL = (
    "pip install llama-cpp-python (builds from source, ~12 min; on these machines use CMAKE_ARGS="
    '"-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF '
    '-DGGML_AMX_BF16=OFF", see ROADMAP)'
)


def find_converter() -> Path | None:
    """convert_hf_to_gguf.py: $LLAMA_CPP_CONVERTER, or a vendor/llama.cpp checkout beside the installed package."""
    env = os.environ.get("LLAMA_CPP_CONVERTER")
    if env:
        return Path(env) if Path(env).is_file() else None
    spec = importlib.util.find_spec("llama_cpp")
    roots = [Path(spec.origin).parent.parent] if spec and spec.origin else []
    for root in roots:
        for cand in (root / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py", root / "convert_hf_to_gguf.py"):
            if cand.is_file():
                return cand
    return None


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, payload: bytes) -> bytes:  # a length-delimited protobuf field
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def standin_sentencepiece(vocab_size: int) -> bytes:
    """A serialized sentencepiece ModelProto with one piece per id: <unk>, <s>, </s>, then '▁t3', '▁t4', ...
    (written by hand, so the protobuf package is not needed)."""
    pieces = bytearray()
    for i in range(vocab_size):
        name, kind = {0: ("<unk>", 2), 1: ("<s>", 3), 2: ("</s>", 3)}.get(i, (f"\u2581t{i}", 1))
        body = _field(1, name.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", -float(i)) + _varint(3 << 3)
        pieces += _field(1, body + _varint(kind))
    trainer = _varint(3 << 3) + _varint(2) + _varint(4 << 3) + _varint(vocab_size)  # model_type BPE, vocab_size
    normalizer = _field(1, b"identity") + _varint(3 << 3) + _varint(1)  # name, add_dummy_prefix
    return bytes(pieces) + _field(2, trainer) + _field(3, normalizer)


def convert_to_gguf(model: ResolvedModel, outtype: str) -> Path:
    """The model's Hugging Face weights as GGUF (cached); raises EngineUnavailable without the converter."""
    converter = find_converter()
    if converter is None:
        raise EngineUnavailable(
            "no convert_hf_to_gguf.py found; set LLAMA_CPP_CONVERTER to the one in "
            "llama-cpp-python's source distribution (vendor/llama.cpp/)"
        )
    weights = sorted(model.hf_path.glob("*.safetensors"))
    key = hashlib.sha256("|".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime}" for p in weights).encode())
    out = cache_dir() / "gguf" / f"{model.name}-{key.hexdigest()[:12]}-{outtype}.gguf"
    if out.is_file():
        return out
    stage = out.with_suffix(".stage")
    stage.mkdir(parents=True, exist_ok=True)
    for p in [*weights, model.hf_path / "config.json", model.hf_path / "generation_config.json"]:
        link = stage / p.name
        if p.is_file() and not link.exists():
            link.symlink_to(p.resolve())
    sp = model.path / "tok512.model" if (model.path / "tok512.model").is_file() else None
    (stage / "tokenizer.model").write_bytes(sp.read_bytes() if sp else standin_sentencepiece(model.vocab_size))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(converter.parent / "gguf-py"), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, str(converter), str(stage), "--outfile", str(out), "--outtype", outtype]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not out.is_file():
        raise EngineUnavailable(f"GGUF conversion failed: {done.stderr.strip()[-800:]}")
    return out


class LlamaCppEngine(Engine):
    name = "llama.cpp"
    kind = "llama.cpp"
    streams = True  # tokens arrive one by one: TTFT and TPOT are measured per request

    def __init__(
        self,
        model: ResolvedModel,
        device: str,
        dtype: str,
        outtype: str | None = None,
        gguf: str | None = None,
        n_ctx: int | None = None,
        threads: int | None = None,
    ):
        if importlib.util.find_spec("llama_cpp") is None:
            raise EngineUnavailable(f"llama-cpp-python is not installed (optional; to add it: {INSTALL})")
        import torch
        from llama_cpp import Llama

        self.outtype = outtype or OUTTYPES[dtype]
        self.gguf = Path(gguf) if gguf else convert_to_gguf(model, self.outtype)
        self.threads = threads or torch.get_num_threads()
        self.llm = Llama(
            model_path=str(self.gguf),
            n_ctx=n_ctx or min(model.max_model_len, 4096),
            n_threads=self.threads,
            n_threads_batch=self.threads,
            n_batch=512,
            seed=0,
            n_gpu_layers=-1 if device.startswith("cuda") else 0,
            verbose=False,
        )

    def run(self, requests: list[Request]) -> RunResult:
        tokens: list[list[int]] = []
        ttft, tpot = [], []
        t0 = time.perf_counter()
        for r in requests:  # one at a time: a request waits for the ones before it
            out: list[int] = []
            first = last = t0
            for tok in self.llm.generate(
                r.prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True
            ):
                last = time.perf_counter()
                if not out:
                    first = last
                out.append(int(tok))
                if len(out) == r.max_tokens:
                    break
            tokens.append(out)
            ttft.append(first - t0)
            tpot.append((last - first) / (len(out) - 1) if len(out) > 1 else 0.0)
        return RunResult(time.perf_counter() - t0, tokens, ttft, tpot)

    def info(self) -> dict[str, Any]:
        import llama_cpp

        return {
            "kind": self.kind,
            "version": getattr(llama_cpp, "__version__", "?"),
            "gguf": str(self.gguf),
            "outtype": self.outtype,
            "threads": self.threads,
            "batching": "none: one request at a time",
        }
