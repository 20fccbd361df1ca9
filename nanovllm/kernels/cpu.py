"""The CPU kernels in C: compiled with the machine's C compiler on first use, cached, and called through ctypes.

Nothing here is needed to run: where there is no C compiler (or NANOVLLM_C_KERNELS=0), `c_kernels_unavailable()`
(paged attention) and `quantized_kernels_unavailable()` (INT8 / INT4 linear layers) say why and the engine keeps to
its PyTorch path. Each C file is its own library, built once per source, compiler and machine into
~/.cache/nanovllm/kernels (NANOVLLM_KERNEL_CACHE to move it); a build takes about a second.
NANOVLLM_KERNEL_FLAGS="-O3 -mavx2 -mfma -fopenmp" (say) builds with those flags instead of trying FLAG_SETS: how
the tests and benchmarks/quant_kernels.py reach the code paths of CPUs older than this one.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

KERNELS = Path(__file__).parent
_P, _I, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
# each library is built from KERNELS / f"{name}.c"; these are the functions it exports: name -> (restype, argtypes)
LIBRARIES = {
    "paged_attention_cpu": {
        "paged_decode_attention": (_I, [_P] * 6 + [_I] * 7 + [_F, _I, _F, _I]),
        "paged_decode_attention_bf16": (_I, [_P] * 6 + [_I] * 7 + [_F, _I, _F, _I]),
    },
    "quant_linear_cpu": {
        "int8_linear": (_I, [_P] * 5 + [_I] * 4),
        "int4_linear": (_I, [_P] * 5 + [_I] * 5),
        "quant_linear_isa": (ctypes.c_char_p, []),
        "int8_dequantize": (_I, [_P] * 3 + [_I] * 4),
        "int4_dequantize": (_I, [_P] * 3 + [_I] * 5),
    },
    "linear_cpu": {"fp32_linear": (_I, [_P] * 4 + [_I] * 4), "dense_linear_lanes": (_I, [])},
    "decode_ops_cpu": {
        "rms_norm": (None, [_P] * 3 + [_I] * 2 + [_F]),
        "rotary": (None, [_P] * 3 + [_I] * 4 + [ctypes.c_int64]),
        "silu_mul": (None, [_P] * 2 + [_I] * 2),
        "decode_layers": (_I, [_P] * 8 + [_I] * 3),
    },
}
# tried in order, the first that compiles is used: not every compiler knows -march=native or OpenMP (macOS's clang)
FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-fopenmp"],
    ["-O3", "-march=native", "-fopenmp-simd"],
    ["-O3"],
)


def _flag_sets() -> tuple[list[str], ...]:
    flags = os.environ.get("NANOVLLM_KERNEL_FLAGS")
    return (flags.split(),) if flags else FLAG_SETS


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _machine() -> bytes:
    """What -march=native compiles for: the architecture and, on Linux, the CPU's model and feature flags.

    A home folder shared between machines must not hand one CPU a library built for another's instructions.
    """
    machine = platform.machine().encode()
    try:
        with open("/proc/cpuinfo", "rb") as f:
            lines = [line for line in f.read(1 << 16).splitlines() if line.startswith((b"model name", b"flags"))]
    except OSError:
        lines = []
    return b"\n".join([machine, *sorted(set(lines))])


def _cache_dir() -> Path:
    return Path(os.environ.get("NANOVLLM_KERNEL_CACHE") or Path.home() / ".cache" / "nanovllm" / "kernels")


@functools.cache
def _load(name: str = "paged_attention_cpu") -> tuple[ctypes.CDLL | None, str | None]:
    """(library `name`, None), or (None, why there is none)."""
    if os.environ.get("NANOVLLM_C_KERNELS", "1") == "0":
        return None, "NANOVLLM_C_KERNELS=0"
    if sys.platform == "win32":
        return None, "the C kernels are not built on Windows"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (set CC, or install cc, gcc or clang)"
    path = KERNELS / f"{name}.c"
    # the source and the headers it may include: a change to either builds a new library
    source = b"".join(p.read_bytes() for p in [path, *sorted(KERNELS.glob("*.h"))])
    machine = _machine()
    errors = []
    for flags in _flag_sets():
        key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(flags).encode(), machine]))
        library = _cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
        if not library.exists():
            library, error = _build(cc, flags, path, library)
            if error:
                errors.append(f"{cc} {' '.join(flags)}: {error}")
                continue
        try:
            lib = ctypes.CDLL(str(library))
        except OSError as e:  # built, but will not load here (a runtime library missing, say)
            errors.append(f"{library.name}: {e}")
            continue
        for function, (restype, argtypes) in LIBRARIES[name].items():
            fn = getattr(lib, function)
            fn.restype, fn.argtypes = restype, argtypes
        return lib, None
    return None, f"the C kernel {path.name} did not compile: " + "; ".join(errors)


def _build(cc: str, flags: list[str], source: Path, library: Path) -> tuple[Path, str | None]:
    """Compile `source` into `library` (or, where its folder cannot be made, a temporary one).

    Returns where the library is and None, or the compiler's complaint.
    """
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
        directory = library.parent
    except OSError:
        directory = Path(tempfile.mkdtemp(prefix="nanovllm-kernels-"))
        library = directory / library.name
    # build under a private name, then rename: processes building at once never load a half-written file
    fd, partial = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(fd)
    command = [cc, *flags, "-fPIC", "-shared", str(source), "-o", partial, "-lm"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        os.unlink(partial)
        return library, str(e)
    if done.returncode != 0:
        os.unlink(partial)
        return library, (done.stderr.strip().splitlines() or ["failed"])[-1]
    os.replace(partial, library)
    return library, None


def c_kernels_unavailable() -> str | None:
    """None when the C kernels are ready to use; otherwise why they are not (no compiler, switched off, ...)."""
    return _load()[1]


KV_DTYPES = (torch.float32, torch.bfloat16)  # the KV pools the C attention kernel reads


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    out: torch.Tensor | None = None,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Decode attention read in place from the block pool: what paged_attention computes for one query per sequence.

    Sequence s attends to its positions 0 .. context_lens[s] - 1, found through block_tables[s]; nothing past
    its own length is read, so sequences of any lengths share one call, unpadded and unmasked. With a window, only
    the last `window` of them (nothing before is read); with a soft cap, scores s become softcap * tanh(s / softcap).

    Args:
        q: (S, Hq, D) float32, one query per sequence (its newest token, whose K/V are already stored).
        k_cache, v_cache: (num_blocks, block_size, Hkv, D) float32 or bfloat16 (both the same), one layer's pool.
        block_tables: (S, max_blocks) int32 physical block ids.
        context_lens: (S,) int32, each sequence's length including its newest token.
        out: optional (S, Hq, D) float32 tensor to write into.
        scale: the score scale, head_dim ** -0.5 by default.
        window: attend to the last `window` positions only (a sliding-window layer); None: all of them.
        softcap: cap the scores (Gemma 2); None: no cap.
    Returns:
        (S, Hq, D) attention output.
    """
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive integer or None, got {window!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")
    lib, why = _load()
    if lib is None:
        raise RuntimeError(f"the C paged attention kernel is not available: {why}")
    S, Hq, D = q.shape
    num_blocks, block_size, Hkv, _ = k_cache.shape
    tensors = {"q": (q, (torch.float32,)), "k_cache": (k_cache, KV_DTYPES), "v_cache": (v_cache, (k_cache.dtype,))}
    for name, (t, dtypes) in tensors.items():
        if t.dtype not in dtypes or t.device.type != "cpu" or not t.is_contiguous():
            kinds = " or ".join(str(d) for d in dtypes)
            raise ValueError(f"{name} must be a contiguous {kinds} CPU tensor, got {t.dtype} on {t.device}")
    if v_cache.shape != k_cache.shape or k_cache.shape[3] != D or Hq % Hkv:
        shapes = f"q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}"
        raise ValueError(f"shapes do not match: {shapes}")
    for name, t, shape in (("block_tables", block_tables, (S, -1)), ("context_lens", context_lens, (S,))):
        if t.dtype != torch.int32 or not t.is_contiguous() or t.dim() != len(shape) or t.shape[0] != S:
            raise ValueError(f"{name} must be a contiguous int32 tensor with {S} rows, got {t.dtype} {tuple(t.shape)}")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor of shape {tuple(q.shape)}")
    if S == 0:
        return out
    kernel = lib.paged_decode_attention_bf16 if k_cache.dtype == torch.bfloat16 else lib.paged_decode_attention
    error = kernel(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(), context_lens.data_ptr(),
        out.data_ptr(), S, Hq, Hkv, D, block_size, block_tables.shape[1], num_blocks,
        D**-0.5 if scale is None else scale, window or 0, softcap or 0.0, torch.get_num_threads(),
    )  # fmt: skip
    if error == 1:
        raise IndexError("a context length or block id is out of range of the block tables or the pool")
    if error:
        raise MemoryError("the C paged attention kernel ran out of memory")
    return out


# The code paths of quant_linear_cpu.c: the /proc/cpuinfo flags each needs and the compiler flags that select it, so
# that one machine can build, check and time the paths of older CPUs too (tests, benchmarks/quant_kernels.py).
QUANT_KERNEL_PATHS = {
    "avx512vnni": ({"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx2", "fma"},
                   "-O3 -mavx2 -mfma -mavx512f -mavx512bw -mavx512vl -mavx512vnni -fopenmp"),
    "avx512bw": ({"avx512f", "avx512bw", "avx512vl", "avx2", "fma"},
                 "-O3 -mavx2 -mfma -mavx512f -mavx512bw -mavx512vl -fopenmp"),
    "avx2": ({"avx2", "fma"}, "-O3 -mavx2 -mfma -fopenmp"),
    "scalar": (set(), "-O3 -fopenmp"),
}  # fmt: skip


def quant_kernel_paths() -> dict[str, str]:
    """The paths of QUANT_KERNEL_PATHS this CPU can run: name -> NANOVLLM_KERNEL_FLAGS that builds it.

    Only the portable one off x86 Linux (no /proc/cpuinfo flags to go by).
    """
    flags: set[str] = set()
    if platform.machine() in ("x86_64", "AMD64"):
        try:
            with open("/proc/cpuinfo") as f:
                flags = {flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
        except OSError:
            pass
    return {name: cflags for name, (needs, cflags) in QUANT_KERNEL_PATHS.items() if needs <= flags}


# Up to this many rows of x (tokens in a step), each code path of the INT8 / INT4 kernels beat fp32 `x @ W_t` on the
# decode shapes of llama-134m, one thread, on the development CPU (a Zen 4; benchmarks/results/cpu-quant-kernels.md):
# past it the engine should rather dequantize and multiply in fp32. Measured by doubling the rows until int8 or int4
# lost on qkv or down (avx512vnni still won 1.55x at 1024, the most measured; the portable path lost at 4 rows).
QUANT_KERNEL_MAX_ROWS = {"avx512vnni": 1024, "avx512bw": 128, "avx2": 64, "scalar": 2}
INT4_GROUP_SIZES = (32, 64, 128)


def quantized_kernels_unavailable() -> str | None:
    """None when the INT8 / INT4 linear kernels are ready to use; otherwise why they are not."""
    return _load("quant_linear_cpu")[1]


def quant_kernel_isa() -> str:
    """Which code path the INT8 / INT4 kernels were compiled with: avx512vnni, avx512bw, avx2 or scalar."""
    return _quant_library().quant_linear_isa().decode()


def quant_kernel_max_rows() -> int:
    """QUANT_KERNEL_MAX_ROWS of the code path built here; 0 where the kernels are not available."""
    return QUANT_KERNEL_MAX_ROWS[quant_kernel_isa()] if quantized_kernels_unavailable() is None else 0


def _quant_library() -> ctypes.CDLL:
    lib, why = _load("quant_linear_cpu")
    if lib is None:
        raise RuntimeError(f"the C quantized linear kernels are not available: {why}")
    return lib


def _check(name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> None:
    """A ValueError unless t is a contiguous CPU tensor of this dtype (and shape): the C code reads raw memory.

    Written for speed (a decode step calls it ~50 times per token): no device objects, no tuple copies.
    """
    if t.dtype != dtype or not t.is_cpu or not t.is_contiguous():
        layout = "" if t.is_contiguous() else "a non-contiguous "
        raise ValueError(f"{name} must be a contiguous {dtype} CPU tensor, got {layout}{t.dtype} on {t.device}")
    if shape is not None and t.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def _linear_output(x, in_features: int, out_features: int, bias, out):
    """Check a linear kernel's activations x (..., in), bias (out,) and out (..., out); return out (new if None)."""
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must have {in_features} features in its last dimension, got shape {tuple(x.shape)}")
    _check("x", x, torch.float32)
    if bias is not None:
        _check("bias", bias, torch.float32, (out_features,))
    shape = (*x.shape[:-1], out_features)
    if out is None:
        return x.new_empty(shape)
    _check("out", out, torch.float32, shape)
    return out


def _quant_linear(kind, x, in_features, weight, scales, bias, out, *extra):
    """Validate x, bias and out against the (already validated) weights, then call the kernel `kind`."""
    out_features = weight.shape[0]
    out = _linear_output(x, in_features, out_features, bias, out)
    rows = x.numel() // in_features
    if rows and out_features:
        error = getattr(_quant_library(), kind)(
            x.data_ptr(), weight.data_ptr(), scales.data_ptr(), None if bias is None else bias.data_ptr(),
            out.data_ptr(), rows, out_features, in_features, *extra, torch.get_num_threads(),
        )  # fmt: skip
        if error:
            raise MemoryError(f"the C {kind} kernel ran out of memory")
    return out


def int8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ W.T (+ bias) with W stored as INT8 per output channel: w[o, i] = scale[o] * qweight[o, i].

    x is quantized to int8 in blocks of 32 (llama.cpp's q8_0) and every block's dot product is done in integers,
    so the result is nanovllm.layers.quant_reference.int8_linear_reference's up to float32 rounding.

    Args:
        x: (..., in) float32 activations, contiguous; few rows (see QUANT_KERNEL_MAX_ROWS) is where it pays.
        qweight: (out, in) int8, contiguous.
        scale: (out,) float32.
        bias: optional (out,) float32.
        out: optional (..., out) float32 tensor to write into.
    Returns:
        (..., out) float32.
    """
    if qweight.dim() != 2 or qweight.shape[1] == 0:
        raise ValueError(f"qweight must be (out, in) with in > 0, got shape {tuple(qweight.shape)}")
    _check("qweight", qweight, torch.int8)
    _check("scale", scale, torch.float32, (qweight.shape[0],))
    return _quant_linear("int8_linear", x, qweight.shape[1], qweight, scale, bias, out)


def int4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ W.T (+ bias) with W stored as INT4, group-wise: w[o, i] = scales[o, i // group_size] * (nibble - 8).

    Byte j of row o of qweight holds input 2j in its low nibble and 2j + 1 in its high nibble. x is quantized as
    for int8_linear; the result is nanovllm.layers.quant_reference.int4_linear_reference's up to float32 rounding.

    Args:
        x: (..., in) float32 activations, contiguous.
        qweight: (out, in // 2) uint8, contiguous, two weights a byte.
        scales: (out, in // group_size) float32.
        group_size: 32, 64 or 128; in must be a multiple of it.
        bias: optional (out,) float32.
        out: optional (..., out) float32 tensor to write into.
    Returns:
        (..., out) float32.
    """
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if qweight.dim() != 2 or qweight.shape[1] == 0:
        raise ValueError(f"qweight must be (out, in // 2) with in > 0, got shape {tuple(qweight.shape)}")
    _check("qweight", qweight, torch.uint8)
    in_features = 2 * qweight.shape[1]
    if in_features % group_size:
        raise ValueError(f"in ({in_features}, twice qweight's columns) must be a multiple of group_size {group_size}")
    _check("scales", scales, torch.float32, (qweight.shape[0], in_features // group_size))
    return _quant_linear("int4_linear", x, in_features, qweight, scales, bias, out, group_size)


def dequantize_rows(
    scheme: str, qweight: torch.Tensor, scales: torch.Tensor, group_size: int, o0: int, o1: int, out: torch.Tensor
) -> torch.Tensor:
    """Rows [o0, o1) of a quantized weight (qweight and scales as int8_linear / int4_linear take them) back to
    float32, written into out ((o1 - o0), in), contiguous; returns out. Bit for bit dequantize_int8 / dequantize_int4
    of nanovllm.layers.quantization, in one pass and into memory the caller keeps (no fresh pages each call)."""
    in_features = qweight.shape[1] * (2 if scheme == "int4" else 1)
    if not 0 <= o0 <= o1 <= qweight.shape[0]:
        raise ValueError(f"rows [{o0}, {o1}) are not within the weight's {qweight.shape[0]} rows")
    _check("qweight", qweight, torch.int8 if scheme == "int8" else torch.uint8)
    _check("out", out, torch.float32, (o1 - o0, in_features))
    extra = (group_size,) if scheme == "int4" else ()
    _check("scales", scales, torch.float32, (qweight.shape[0], *((in_features // group_size,) if extra else ())))
    getattr(_quant_library(), f"{scheme}_dequantize")(
        qweight.data_ptr(), scales.data_ptr(), out.data_ptr(), o0, o1, in_features, *extra, torch.get_num_threads()
    )
    return out


# Up to this many rows of x (tokens in a step), the engine's Linear layers call fp32_linear: it beat fp32 `x @ W_t` on
# every decode shape of llama-20m and llama-134m at 1 to 64 rows, one thread, on the development CPU (a Zen 4, AVX-512;
# 1.1-1.4x at 64 rows, ~1x at 128; benchmarks/results/cpu-linear-kernel.md). Past it a prefill's rows go to PyTorch.
LINEAR_KERNEL_MAX_ROWS = 64


def linear_kernel_unavailable() -> str | None:
    """None when the fp32 linear kernel is ready to use; otherwise why it is not."""
    return _load("linear_cpu")[1]


def fp32_linear(
    x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ w_t (+ bias) for a few rows of x, with w_t = W^T (in, out) as nanovllm.layers.linear.Linear keeps it.

    The same products as PyTorch's, summed in another order (float32 rounding apart, the same result); faster up to
    LINEAR_KERNEL_MAX_ROWS rows, where a step is bound by reading w_t and by each matmul's fixed cost.

    Args:
        x: (..., in) float32 activations, contiguous.
        w_t: (in, out) float32, contiguous.
        bias: optional (out,) float32.
        out: optional (..., out) float32 tensor to write into.
    Returns:
        (..., out) float32.
    """
    if w_t.dim() != 2:
        raise ValueError(f"w_t must be (in, out), got shape {tuple(w_t.shape)}")
    in_features, out_features = w_t.shape
    _check("w_t", w_t, torch.float32)
    out = _linear_output(x, in_features, out_features, bias, out)
    if out.numel():  # (in = 0 too: then the kernel writes the bias, or zeros)
        lib, why = _load("linear_cpu")
        if lib is None:
            raise RuntimeError(f"the C linear kernel is not available: {why}")
        if lib.fp32_linear(
            x.data_ptr(), w_t.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr(),
            out.numel() // out_features, out_features, in_features, torch.get_num_threads(),
        ):  # fmt: skip
            raise MemoryError("the C fp32_linear kernel ran out of memory")
    return out
