"""Exercises for ch07: your version of nanovllm.layers.quantization.

Fill in each function marked with a task; the docstring says what it computes.
Check your work with: pytest --impl=exercises -m ch07 -k "task1|task2|task3"
"""

from __future__ import annotations
import threading
from collections.abc import Callable
import torch
from torch import nn
from nanovllm.kernels.cpu import INT4_GROUP_SIZES
from nanovllm.layers.linear import Linear
from nanovllm.layers.quantization import SCHEMES, RowMax, dequantize_int8, dequantize_int4, QuantLinear, DEQUANTIZE_FLOATS, _buffers, _dequantize_buffer, kernel_path, triton_kernels, cpu_kernels, quantize_model_, weight_bytes  # the rest of the file, as given
import nanovllm.layers.quantization as _reference


def quantize_int8(w: torch.Tensor, absmax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT8 quantization with one scale per output channel (row of W).

    Each row's scale maps its largest magnitude to 127: scale[o] = max_i |w[o, i]| / 127, and
    q[o, i] = round(w[o, i] / scale[o]), in [-127, 127]. Dequantized, w ≈ scale[o] * q[o, i], with an error of
    at most scale[o] / 2 per weight. A row of zeros gets scale 1 (any scale represents it exactly).

    Args:
        w: (out, in) float weight, in the (out, in) layout of nn.Linear.
        absmax: (out,) each row's largest magnitude, when w is a slice of the row (a tensor-parallel rank's
            columns) and the scale must be the whole row's.
    Returns:
        qweight (out, in) int8, scale (out,) float32.
    """
    raise NotImplementedError("ch07 task 1: INT8 with one scale per output channel")


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT4 quantization per group of `group_size` inputs, two values packed into each byte.

    Each row is cut into groups of group_size consecutive inputs, each with its own scale, so that one large
    weight costs precision only to its group: scale[o, g] = max |w| of the group / 7, and
    q = round(w / scale), clamped to [-8, 7]. Stored as the nibble n = q + 8 (0..15); the byte j of row o
    holds input 2j in its low nibble and input 2j + 1 in its high nibble: byte = n[2j] | n[2j + 1] << 4.
    Dequantized, w ≈ scale[o, i // group_size] * (n - 8).

    Args:
        w: (out, in) float weight; in is a multiple of group_size.
        group_size: inputs per scale (32, 64 or 128).
    Returns:
        qweight (out, in // 2) uint8, scales (out, in // group_size) float32.
    """
    raise NotImplementedError("ch07 task 2: INT4 per group, two values a byte")


class QuantLinear(_reference.QuantLinear):
    """A Linear whose weight is stored quantized (INT8 per channel or INT4 per group); the bias stays float.

On the CPU, a few rows at a time (decode steps) go to a C kernel that reads the quantized bytes and does
integer dot products; many rows (prefill chunks, big batches), where the matmul is compute-bound rather than
bound by reading weights, or a machine without the kernel, dequantize the weight and use a float matmul.
On a CUDA GPU every step goes to a Triton kernel (nanovllm/kernels/triton/quant_matmul.py) that reads the
quantized bytes and multiplies in x's dtype on the tensor cores; kernel_path() below decides. Yours: the methods below; the rest is inherited."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x W^T + b with the quantized W: (..., in) -> (..., out), in x's dtype.

        Rows go to the C kernel (integer dot products over the quantized bytes) when x is on the CPU, the kernel
        is available and there are at most quant_kernel_max_rows() of them (measured per code path: where the
        kernel still beats fp32); otherwise W is dequantized to float32 and multiplied as a float matrix (the same
        weights, without the activation rounding the kernel does). On a CUDA GPU with Triton: triton_forward.
        """
        raise NotImplementedError("ch07 task 3: a quantized linear layer's forward")
