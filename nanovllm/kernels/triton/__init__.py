"""The Triton kernels: KV store by slot mapping, paged decode with split-K, varlen prefill over the pool (chapter 5),
and the weight-only INT8 / INT4 matmuls of QuantLinear (chapter 7).

On a machine with a CUDA GPU the kernels compile for it and take CUDA tensors. Without one, importing this package
sets TRITON_INTERPRET=1 (unless the variable is already set) BEFORE Triton is imported and the kernels decorated:
Triton's interpreter then runs them on CPU tensors, program by program, with numpy. That is slow (use small shapes)
but exact, so the engine's Triton backend and its tests run on any machine. The setting is read once per process,
when the kernels are first decorated: set TRITON_INTERPRET yourself before any import to choose otherwise.

Nothing here is needed to run the engine: `triton_unavailable()` says why the kernels cannot be used (Triton not
installed, or no GPU with the interpreter switched off), and the engine then keeps to its PyTorch or C path.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except Exception as e:  # ImportError, or a broken install that fails while loading its compiled parts
    _WHY: str | None = f"triton is not importable: {type(e).__name__}: {e}"
else:
    from nanovllm.kernels.triton._common import INTERPRETING, interpret_triton_library

    if INTERPRETING:
        interpret_triton_library()
    from nanovllm.kernels.triton.decode_attention import choose_num_splits, paged_decode_attention
    from nanovllm.kernels.triton.prefill_attention import varlen_prefill_attention
    from nanovllm.kernels.triton.quant_matmul import int4_matmul, int8_matmul
    from nanovllm.kernels.triton.store_kv import store_kv

    _WHY = None
    if not INTERPRETING and not torch.cuda.is_available():
        _WHY = "no CUDA GPU, and TRITON_INTERPRET is off (set it to 1 to run the kernels on the CPU)"

__all__ = [
    "INTERPRETING",
    "choose_num_splits",
    "int4_matmul",
    "int8_matmul",
    "paged_decode_attention",
    "store_kv",
    "triton_unavailable",
    "varlen_prefill_attention",
]


def triton_unavailable() -> str | None:
    """None when the Triton kernels can run here (compiled on a GPU, or interpreted on the CPU); otherwise why not."""
    return _WHY


def __getattr__(name: str):
    # without Triton the kernel names are missing: say why instead of a bare AttributeError
    if name in __all__ and _WHY is not None:
        raise ImportError(f"nanovllm.kernels.triton.{name} cannot be used: {_WHY}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
