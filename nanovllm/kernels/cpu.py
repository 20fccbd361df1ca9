"""The CPU kernels in C: compiled with the machine's C compiler on first use, cached, and called through ctypes.

Nothing here is needed to run: where there is no C compiler (or NANOVLLM_C_KERNELS=0), `c_kernels_unavailable()`
says why and the engine keeps to its PyTorch path. The library is built once per source, compiler and machine
into ~/.cache/nanovllm/kernels (NANOVLLM_KERNEL_CACHE to move it); a build takes about a second.
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

SOURCE = Path(__file__).with_name("paged_attention_cpu.c")
# tried in order, the first that compiles is used: not every compiler knows -march=native or OpenMP (macOS's clang)
FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-fopenmp"],
    ["-O3", "-march=native", "-fopenmp-simd"],
    ["-O3"],
)


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
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    """(the library, None), or (None, why there is none)."""
    if os.environ.get("NANOVLLM_C_KERNELS", "1") == "0":
        return None, "NANOVLLM_C_KERNELS=0"
    if sys.platform == "win32":
        return None, "the C kernels are not built on Windows"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (set CC, or install cc, gcc or clang)"
    source, machine = SOURCE.read_bytes(), _machine()
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(flags).encode(), machine]))
        library = _cache_dir() / f"paged_attention_cpu-{key.hexdigest()[:16]}.so"
        if not library.exists():
            library, error = _build(cc, flags, library)
            if error:
                errors.append(f"{cc} {' '.join(flags)}: {error}")
                continue
        try:
            lib = ctypes.CDLL(str(library))
        except OSError as e:  # built, but will not load here (a runtime library missing, say)
            errors.append(f"{library.name}: {e}")
            continue
        fn = lib.paged_decode_attention
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 7 + [ctypes.c_float, ctypes.c_int]
        return lib, None
    return None, "the C kernel did not compile: " + "; ".join(errors)


def _build(cc: str, flags: list[str], library: Path) -> tuple[Path, str | None]:
    """Compile SOURCE into `library` (or, where its folder cannot be made, a temporary one).

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
    command = [cc, *flags, "-fPIC", "-shared", str(SOURCE), "-o", partial, "-lm"]
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


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention read in place from the block pool: what paged_attention computes for one query per sequence.

    Sequence s attends to its positions 0 .. context_lens[s] - 1, found through block_tables[s]; nothing past
    its own length is read, so sequences of any lengths share one call, unpadded and unmasked.

    Args:
        q: (S, Hq, D) float32, one query per sequence (its newest token, whose K/V are already stored).
        k_cache, v_cache: (num_blocks, block_size, Hkv, D) float32, one layer's pool.
        block_tables: (S, max_blocks) int32 physical block ids.
        context_lens: (S,) int32, each sequence's length including its newest token.
        out: optional (S, Hq, D) float32 tensor to write into.
    Returns:
        (S, Hq, D) attention output.
    """
    lib, why = _load()
    if lib is None:
        raise RuntimeError(f"the C paged attention kernel is not available: {why}")
    S, Hq, D = q.shape
    num_blocks, block_size, Hkv, _ = k_cache.shape
    tensors = {"q": q, "k_cache": k_cache, "v_cache": v_cache}
    for name, t in tensors.items():
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 CPU tensor, got {t.dtype} on {t.device}")
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
    error = lib.paged_decode_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(), context_lens.data_ptr(),
        out.data_ptr(), S, Hq, Hkv, D, block_size, block_tables.shape[1], num_blocks, D**-0.5,
        torch.get_num_threads(),
    )  # fmt: skip
    if error == 1:
        raise IndexError("a context length or block id is out of range of the block tables or the pool")
    if error:
        raise MemoryError("the C paged attention kernel ran out of memory")
    return out
