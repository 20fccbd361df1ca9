"""Linear: nn.Linear that, once loaded for inference, keeps its weight transposed, (in, out), in memory."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LINEAR_KERNELS = ("c", "torch")  # the engine's linear_kernel option (chapter 6): None picks one


class Linear(nn.Linear):
    """y = x W^T + b, as nn.Linear; `transpose_weight_()` then stores W^T contiguously and computes x @ W^T.

    Why: a decode step multiplies one vector by every weight matrix, so it is bound by reading the
    weights. Reading W^T (in, out) row after row streams memory in order; on the CPUs measured here
    that ran twice as fast as F.linear(x, W) for a 32000 x 384 fp32 matrix (2.8 vs 5.9 ms). The values
    are the same, only their layout changes; checkpoints and training keep the (out, in) layout.

    Chapter 6: `use_linear_kernel_` may give it a C kernel for a few rows of x (decode steps on a CPU), which reads
    the same W^T without PyTorch's fixed cost per matmul.
    """

    weight_is_transposed = False
    kernel = None  # fn(x, w_t, bias) -> y, used for inputs of up to kernel_max_numel values
    kernel_max_numel = -1

    @torch.no_grad()
    def transpose_weight_(self) -> None:
        if not self.weight_is_transposed:
            self.weight = nn.Parameter(self.weight.t().contiguous(), requires_grad=False)  # (in, out)
            self.weight_is_transposed = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.weight_is_transposed:
            return F.linear(x, self.weight, self.bias)
        if x.numel() <= self.kernel_max_numel and x.is_contiguous():
            return self.kernel(x, self.weight, self.bias)  # (..., out)
        out = x @ self.weight  # (..., in) @ (in, out)
        return out if self.bias is None else out + self.bias


def use_linear_kernel_(model: nn.Module, choice: str | None, device: str | torch.device = "cpu") -> str:
    """Give every Linear of `model` (transposed, float32, on the CPU) the C kernel for few rows, or take it away.

    choice 'c' wants the C kernel (a ValueError saying why where it cannot run), 'torch' keeps PyTorch's matmul, and
    None takes the C kernel where it can run. Returns what the model now uses: 'c' or 'torch'. Quantized layers
    (chapter 7's QuantLinear, not a Linear) keep their own kernels.
    """
    if choice is not None and choice not in LINEAR_KERNELS:
        raise ValueError(f"linear_kernel must be one of {LINEAR_KERNELS} or None, got {choice!r}")
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    why = None if choice != "torch" else "asked for"
    if why is None and torch.device(device).type != "cpu":
        why = f"the C kernel runs on the CPU, not on {device}"
    if why is None and any(m.weight.dtype != torch.float32 or not m.weight_is_transposed for m in layers):
        why = "the C kernel multiplies float32 weights only (transposed, as the loader leaves them)"
    if why is None:
        from nanovllm.kernels import cpu  # imported here: building the kernel is the engine's choice, not the layer's

        why = cpu.linear_kernel_unavailable()
    if why is not None and choice == "c":
        raise ValueError(f"linear_kernel='c' cannot be used: {why}")
    for m in layers:
        if why is None:
            m.kernel, m.kernel_max_numel = cpu.fp32_linear, cpu.LINEAR_KERNEL_MAX_ROWS * m.in_features
        else:
            m.kernel, m.kernel_max_numel = None, -1
    return "torch" if why is not None else "c"
