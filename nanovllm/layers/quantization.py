"""Weight-only quantization (chapter 7): INT8 per output channel, INT4 per group of inputs, and the QuantLinear
that multiplies by them. A decode step reads every weight once, so fewer bytes a weight is a faster step."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch import nn

from nanovllm.kernels.cpu import INT4_GROUP_SIZES  # the group sizes the kernels handle: one list for both
from nanovllm.layers.linear import Linear

SCHEMES = ("int8", "int4")
RowMax = Callable[[torch.Tensor], torch.Tensor]  # (out,) a slice's row maxima -> the whole rows' maxima


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
    w = w.float()
    scale = (w.abs().amax(dim=1) if absmax is None else absmax.float()) / 127  # (out,)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize_int8(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(out, in) float32 weights back from INT8 and their per-row scales."""
    return qweight.float() * scale[:, None]


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
    out_features, in_features = w.shape
    groups = w.float().view(out_features, in_features // group_size, group_size)  # (out, G, group)
    scales = groups.abs().amax(dim=2) / 7  # (out, G)
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    q = torch.round(groups / scales[..., None]).clamp(-8, 7).to(torch.int16) + 8  # nibbles 0..15
    q = q.view(out_features, in_features // 2, 2)  # (out, in / 2, 2): the two inputs of each byte
    packed = (q[..., 0] | (q[..., 1] << 4)).to(torch.uint8)
    return packed.contiguous(), scales.contiguous()


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in) float32 weights back from packed INT4 nibbles and their per-group scales."""
    low = (qweight & 0xF).to(torch.int16) - 8
    high = (qweight >> 4).to(torch.int16) - 8
    q = torch.stack((low, high), dim=-1).flatten(1)  # (out, in): inputs 2j, 2j + 1 side by side again
    return (q.float().view(q.shape[0], -1, group_size) * scales[..., None]).flatten(1)


class QuantLinear(nn.Module):
    """A Linear whose weight is stored quantized (INT8 per channel or INT4 per group); the bias stays float.

    On the CPU, a few rows at a time (decode steps) go to a C kernel that reads the quantized bytes and does
    integer dot products; many rows (prefill chunks, big batches), where the matmul is compute-bound rather than
    bound by reading weights, or a machine without the kernel, dequantize the weight and use a float matmul.
    On a CUDA GPU every step goes to a Triton kernel (nanovllm/kernels/triton/quant_matmul.py) that reads the
    quantized bytes and multiplies in x's dtype on the tensor cores; kernel_path() below decides.
    """

    def __init__(self, linear: nn.Linear, scheme: str, group_size: int = 32, row_max: RowMax | None = None):
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"quantization must be one of {SCHEMES}, got {scheme!r}")
        if scheme == "int4" and group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"INT4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")
        w = linear.weight.detach()
        w = w.t() if getattr(linear, "weight_is_transposed", False) else w  # (out, in)
        self.out_features, self.in_features = w.shape
        self.scheme, self.group_size = scheme, group_size
        if scheme == "int4" and self.in_features % group_size:
            advice = (  # under tensor parallelism in_features is one rank's shard: fewer ranks, wider shards
                "choose a smaller group (int4-g32 is the smallest)" if group_size > min(INT4_GROUP_SIZES)
                else "no INT4 group fits; use int8 (or, under tensor parallelism, fewer ranks)"
            )  # fmt: skip
            raise ValueError(
                f"INT4 with groups of {group_size} needs in_features ({self.in_features}) to be a multiple of "
                f"{group_size}: {advice}"
            )
        if scheme == "int8":  # row_max: the whole rows' largest magnitudes, for a row-parallel rank's columns
            q, s = quantize_int8(w, None if row_max is None else row_max(w.float().abs().amax(dim=1)))
        else:  # a group of inputs lies within one rank's columns: its scale is the same as the whole row's
            q, s = quantize_int4(w, group_size)
        self.register_buffer("qweight", q)
        self.register_buffer("scales", s)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored weight (quantized values and scales)."""
        return self.qweight.nbytes + self.scales.nbytes

    def dequantized(self) -> torch.Tensor:
        """The (out, in) float32 weight the quantized one stands for."""
        if self.scheme == "int8":
            return dequantize_int8(self.qweight, self.scales)
        return dequantize_int4(self.qweight, self.scales, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x W^T + b with the quantized W: (..., in) -> (..., out), in x's dtype.

        Rows go to the C kernel (integer dot products over the quantized bytes) when x is on the CPU, the kernel
        is available and there are at most quant_kernel_max_rows() of them (measured per code path: where the
        kernel still beats fp32); otherwise W is dequantized to float32 and multiplied as a float matrix (the same
        weights, without the activation rounding the kernel does). On a CUDA GPU with Triton: triton_forward.
        """
        path = kernel_path(x.device.type, x.numel() // self.in_features)
        if path == "triton":
            return self.triton_forward(x)
        rows = x.reshape(-1, self.in_features).float().contiguous()  # (M, in)
        if path == "c":
            kernels = cpu_kernels()
            if self.scheme == "int8":
                y = kernels.int8_linear(rows, self.qweight, self.scales, self.bias)
            else:
                y = kernels.int4_linear(rows, self.qweight, self.scales, self.group_size, self.bias)
        else:
            y = self.dequantized_matmul(rows)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)  # (..., out)

    def dequantized_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (M, in) float32 @ W^T + b with W dequantized: (M, out). On the CPU with the C kernels, W comes back
        a slice of its rows at a time into one reused buffer (DEQUANTIZE_FLOATS): a whole fresh float32 copy per call
        cost more than the matmul at tens of rows (mostly the page faults of new memory), and a slice stays in cache
        for the matmul that reads it. A W that fits in one slice is multiplied whole, with no transposed copy."""
        kernels = cpu_kernels() if rows.device.type == "cpu" else None
        if kernels is None:
            y = rows @ self.dequantized().T
            return y if self.bias is None else y + self.bias
        buffer = _dequantize_buffer(self.in_features)
        step = max(1, DEQUANTIZE_FLOATS // self.in_features)
        if step >= self.out_features:  # W in one slice: x W^T straight into y, no transposed copy
            w = buffer[: self.out_features * self.in_features].view(self.out_features, self.in_features)
            kernels.dequantize_rows(self.scheme, self.qweight, self.scales, self.group_size, 0, self.out_features, w)
            y = torch.mm(rows, w.T)  # (M, out)
            return y if self.bias is None else y.add_(self.bias)
        y_t = rows.new_empty(self.out_features, rows.shape[0])  # (out, M): each slice of W fills rows of it
        for o0 in range(0, self.out_features, step):
            o1 = min(o0 + step, self.out_features)
            w = buffer[: (o1 - o0) * self.in_features].view(o1 - o0, self.in_features)  # (rows of W, in)
            kernels.dequantize_rows(self.scheme, self.qweight, self.scales, self.group_size, o0, o1, w)
            torch.mm(w, rows.T, out=y_t[o0:o1])
        y = y_t.T.contiguous()  # (M, out)
        return y if self.bias is None else y.add_(self.bias)

    def triton_forward(self, x: torch.Tensor) -> torch.Tensor:
        """forward on a GPU: the Triton kernel reads the quantized bytes; x stays in its dtype (bf16 on a GPU), and
        so does y, accumulated in float32."""
        rows = x.reshape(-1, self.in_features).contiguous()  # (M, in)
        kernels = triton_kernels()
        if self.scheme == "int8":
            y = kernels.int8_matmul(rows, self.qweight, self.scales, self.bias)
        else:
            y = kernels.int4_matmul(rows, self.qweight, self.scales, self.group_size, self.bias)
        return y.view(*x.shape[:-1], self.out_features)  # (..., out)


# A slice of W dequantized at a time: 4 MB of float32, within L3. A W that fits is multiplied whole, x W^T straight
# into y: on llama-20m (every layer fits; 1 MB slices cut them in 2-4) the 58 prompt-carrying steps of mixed-64 at 16
# sequences went from 10.8 to 9.7 s, as fast as fp32's own matmuls (Zen 1, 2 threads).
DEQUANTIZE_FLOATS = 1 << 20
_buffers = threading.local()  # one buffer per thread: two engines stepping in two threads never share one


def _dequantize_buffer(floats: int) -> torch.Tensor:
    """This thread's buffer, DEQUANTIZE_FLOATS long or one row of W if a row is longer."""
    if getattr(_buffers, "floats", None) is None or _buffers.floats.numel() < floats:
        _buffers.floats = torch.empty(max(floats, DEQUANTIZE_FLOATS))
    return _buffers.floats


def kernel_path(device_type: str, rows: int) -> str:
    """Which code multiplies `rows` rows of x on this device type: 'triton', 'c' or 'dequantize'.

    On a GPU, the Triton kernel at every batch size: it reads the quantized bytes and multiplies on the tensor
    cores, so it has no cross-over to fall back from. On the CPU, the C kernel up to its measured row limit.
    """
    if device_type == "cuda":
        return "triton" if triton_kernels() is not None else "dequantize"
    kernels = cpu_kernels() if device_type == "cpu" else None
    return "c" if kernels is not None and rows <= kernels.quant_kernel_max_rows() else "dequantize"


def triton_kernels():
    """nanovllm.kernels.triton when its kernels can run here (a GPU, or the interpreter), else None (no Triton)."""
    from nanovllm.kernels import triton  # imported here, where a GPU asks: without one it turns the interpreter on

    return triton if triton.triton_unavailable() is None else None


def cpu_kernels():
    """nanovllm.kernels.cpu when its quantized kernels can run here (built with the machine's compiler), else None."""
    from nanovllm.kernels import cpu

    unavailable = getattr(cpu, "quantized_kernels_unavailable", None)
    return cpu if unavailable is not None and unavailable() is None else None


def quantize_model_(
    model: nn.Module,
    scheme: str,
    group_size: int = 32,
    lm_head: bool = True,
    row_max: Callable[[str], RowMax | None] | None = None,
) -> nn.Module:
    """Replace every Linear of the decoder's layers (and the output layer, if lm_head) by a QuantLinear, in place.
    Embeddings and norms stay in full precision. row_max(name), under tensor parallelism: how the layer of that
    name finds its whole rows' largest magnitudes from its slice's (an all-reduce for a row-parallel one), so that
    each rank's INT8 scales are the one-process engine's."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear)]
    for name, module in targets:
        if name == "lm_head" and not lm_head:
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, QuantLinear(module, scheme, group_size, row_max and row_max(name)))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every weight the model holds (quantized ones at their stored size), each tensor counted once."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.nbytes
    return total
