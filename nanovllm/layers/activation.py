"""SwiGLU, the gated activation of the Llama MLP."""

import torch
import torch.nn.functional as F


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The SwiGLU gate: silu(gate) * up, elementwise.

    silu(x) = x * sigmoid(x). In the MLP, down_proj(silu(gate_proj(x)) * up_proj(x)):
    the gate decides, per hidden channel, how much of `up` passes through.

    Args:
        gate: (..., F) output of gate_proj.
        up: (..., F) output of up_proj.
    Returns:
        (..., F) tensor.
    """
    return F.silu(gate) * up
