"""Linear: nn.Linear that, once loaded for inference, keeps its weight transposed, (in, out), in memory."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """y = x W^T + b, as nn.Linear; `transpose_weight_()` then stores W^T contiguously and computes x @ W^T.

    Why: a decode step multiplies one vector by every weight matrix, so it is bound by reading the
    weights. Reading W^T (in, out) row after row streams memory in order; on the CPUs measured here
    that ran twice as fast as F.linear(x, W) for a 32000 x 384 fp32 matrix (2.8 vs 5.9 ms). The values
    are the same, only their layout changes; checkpoints and training keep the (out, in) layout.
    """

    weight_is_transposed = False

    @torch.no_grad()
    def transpose_weight_(self) -> None:
        if not self.weight_is_transposed:
            self.weight = nn.Parameter(self.weight.t().contiguous(), requires_grad=False)  # (in, out)
            self.weight_is_transposed = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.weight_is_transposed:
            return F.linear(x, self.weight, self.bias)
        out = x @ self.weight  # (..., in) @ (in, out)
        return out if self.bias is None else out + self.bias
