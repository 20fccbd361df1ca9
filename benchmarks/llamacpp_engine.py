"""Optional engine: llama.cpp through `llama-cpp-python`, on the same weights converted to GGUF.

The Hugging Face -> GGUF converter ships in llama-cpp-python's source distribution
(vendor/llama.cpp/convert_hf_to_gguf.py, with gguf-py), not in its wheel: point
$LLAMA_CPP_CONVERTER at it. The converter wants a tokenizer it knows; the benchmark feeds
token ids, so a stand-in sentencepiece model (one piece per id) is written beside the
weights in a staging folder. Requests are served one at a time, streamed, greedy.

Quantized GGUF (`llama.cpp-q8_0`, `llama.cpp-q4_0`, ...): the types the converter writes itself (f32, f16, bf16,
q8_0) come from it; the others from the f32 GGUF through llama.cpp's own quantizer, `llama_model_quantize` (what
the `llama-quantize` tool calls, which the wheel does not install), with its default choices: for q4_0 that keeps
the output layer in q6_K unless `pure=True`. Every file is cached by the weights' key and its type, and
`info()` records the GGUF's tensor types, so a table says what was measured.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import hashlib
import importlib.util
import io
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import BenchError
from benchmarks.engines import Engine, EngineUnavailable, RunResult
from benchmarks.models import ResolvedModel, cache_dir
from benchmarks.workloads import Request

OUTTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # written by convert_hf_to_gguf.py --outtype itself
# through llama_model_quantize from the f32 GGUF: llama.cpp's LLAMA_FTYPE_MOSTLY_<TYPE> names, spelled as
# llama-quantize spells them
QUANTIZER_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_K", "q3_K_M", "q4_K_S", "q4_K_M", "q5_K_S", "q5_K_M", "q6_K")
# ggml_type ids as a GGUF stores them (ggml.h), for the tensor-type census in info()
GGML_TYPES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 6: "q5_0", 7: "q5_1", 8: "q8_0", 10: "q2_K", 11: "q3_K"}
GGML_TYPES |= {12: "q4_K", 13: "q5_K", 14: "q6_K", 15: "q8_K", 30: "bf16"}
INSTALL = (
    "pip install llama-cpp-python (builds from source, ~12 min; on these machines use CMAKE_ARGS="
    '"-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF '
    '-DGGML_AMX_BF16=OFF", see ROADMAP)'
)


def llama_cpp_cache() -> Path:
    """Where tools/build_llama_server.sh unpacks llama.cpp and builds llama-server (its default DEST)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nanovllm" / "llama.cpp"


def find_converter() -> Path | None:
    """convert_hf_to_gguf.py: $LLAMA_CPP_CONVERTER, a vendor/llama.cpp checkout beside the installed package, or
    the source distribution tools/build_llama_server.sh unpacked."""
    env = os.environ.get("LLAMA_CPP_CONVERTER")
    if env:
        return Path(env) if Path(env).is_file() else None
    spec = importlib.util.find_spec("llama_cpp")
    roots = [Path(spec.origin).parent.parent] if spec and spec.origin else []
    # the source distribution tools/build_llama_server.sh unpacks into the cache
    roots += sorted(llama_cpp_cache().glob("llama_cpp_python-*"))
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


def gguf_type(name: str) -> str:
    """A GGUF type this engine can make, spelled as llama.cpp spells it ('Q4_0' -> 'q4_0', 'q4_k_m' -> 'q4_K_M');
    a BenchError naming the ones it can, otherwise."""
    for known in (*CONVERTER_TYPES, *QUANTIZER_TYPES):
        if name.lower() == known.lower():
            return known
    raise BenchError(
        f"llama.cpp-{name}: not a GGUF type this benchmark makes; types: {', '.join(CONVERTER_TYPES + QUANTIZER_TYPES)}"
    )


def _weights_key(model: ResolvedModel) -> str:
    weights = sorted(model.hf_path.glob("*.safetensors"))
    key = hashlib.sha256("|".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime}" for p in weights).encode())
    return key.hexdigest()[:12]


def make_gguf(model: ResolvedModel, outtype: str, pure: bool = False, threads: int = 1) -> Path:
    """The model's weights as a GGUF of type `outtype` (cached): the converter's own types directly, the others
    quantized from the f32 GGUF by llama.cpp (`pure`: every matrix in that type, as llama-quantize --pure)."""
    outtype = gguf_type(outtype)
    if outtype in CONVERTER_TYPES and not pure:
        return convert_to_gguf(model, outtype)
    out = cache_dir() / "gguf" / f"{model.name}-{_weights_key(model)}-{outtype}{'-pure' if pure else ''}.gguf"
    if out.is_file():
        return out
    import llama_cpp

    source = convert_to_gguf(model, "f32")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{outtype.upper()}")
    params.nthread = threads
    params.pure = pure
    tmp = out.with_suffix(".tmp")  # a run killed mid-write must not leave a file the cache would take as done
    log = io.StringIO()  # llama.cpp logs every tensor through a Python callback on sys.stderr: kept for an error
    with contextlib.redirect_stderr(log):
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise EngineUnavailable(f"llama_model_quantize to {outtype} failed (status {rc}): {log.getvalue()[-800:]}")
    tmp.replace(out)
    return out


def convert_to_gguf(model: ResolvedModel, outtype: str) -> Path:
    """The model's Hugging Face weights as GGUF (cached); raises EngineUnavailable without the converter."""
    converter = find_converter()
    if converter is None:
        raise EngineUnavailable(
            "no convert_hf_to_gguf.py found; set LLAMA_CPP_CONVERTER to the one in "
            "llama-cpp-python's source distribution (vendor/llama.cpp/)"
        )
    weights = sorted(model.hf_path.glob("*.safetensors"))
    out = cache_dir() / "gguf" / f"{model.name}-{_weights_key(model)}-{outtype}.gguf"
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
    tmp = out.with_suffix(".tmp")  # renamed when complete, so an interrupted conversion is redone, not reused
    cmd = [sys.executable, str(converter), str(stage), "--outfile", str(tmp), "--outtype", outtype]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise EngineUnavailable(f"GGUF conversion failed: {done.stderr.strip()[-800:]}")
    tmp.replace(out)
    return out


def gguf_tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each type a GGUF holds ({'q4_0': 84, 'q6_K': 1, 'f32': 25}), read from its header
    (GGUF v2/v3, little-endian), so a quantized run records what it measured (llama-quantize keeps some
    tensors in other types)."""
    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    with open(path, "rb") as f:

        def read(fmt: str):
            return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))[0]

        def skip_value(vtype: int) -> None:
            if vtype == 8:  # string: u64 length, bytes
                f.seek(read("Q"), 1)
            elif vtype == 9:  # array: element type, u64 count, elements
                etype, count = read("I"), read("Q")
                if etype in scalar:
                    f.seek(struct.calcsize("<" + scalar[etype]) * count, 1)
                else:
                    for _ in range(count):
                        skip_value(etype)
            else:
                f.seek(struct.calcsize("<" + scalar[vtype]), 1)

        if f.read(4) != b"GGUF" or read("I") < 2:
            return {}
        n_tensors, n_kv = read("Q"), read("Q")
        for _ in range(n_kv):
            f.seek(read("Q"), 1)  # the key
            skip_value(read("I"))
        types: collections.Counter[str] = collections.Counter()
        for _ in range(n_tensors):
            f.seek(read("Q"), 1)  # the name
            f.seek(8 * read("I"), 1)  # the dimensions
            t = read("I")
            types[GGML_TYPES.get(t, str(t))] += 1
            f.seek(8, 1)  # the data offset
    return dict(types.most_common())


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
        pure: bool = False,
    ):
        """`outtype`: the GGUF type (default: the run's dtype; q8_0, q4_0, ... are quantized, see make_gguf);
        `pure`: quantize every matrix to that type, the output layer too; `gguf`: a GGUF file to use as it is."""
        if importlib.util.find_spec("llama_cpp") is None:
            raise EngineUnavailable(f"llama-cpp-python is not installed (optional; to add it: {INSTALL})")
        import torch
        from llama_cpp import Llama

        self.outtype = gguf_type(outtype or OUTTYPES[dtype])
        self.threads = threads or torch.get_num_threads()
        self.pure = pure
        self.gguf = Path(gguf) if gguf else make_gguf(model, self.outtype, pure, self.threads)
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
            "pure": self.pure,
            "gguf_bytes": self.gguf.stat().st_size,
            "gguf_tensor_types": gguf_tensor_types(self.gguf),
            "threads": self.threads,
            "batching": "none: one request at a time",
        }
