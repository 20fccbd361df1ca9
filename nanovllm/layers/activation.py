"""SwiGLU, the gated activation of the Llama MLP (and GeGLU, Gemma's)."""

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


def gated_activation(act: str, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The MLP's gate by the config's activation: SwiGLU ('silu'), or GeGLU, gelu(gate) * up, which Gemma uses with
    gelu's tanh approximation ('gelu_pytorch_tanh') and older configs exactly ('gelu')."""
    if act == "silu":
        return silu_and_mul(gate, up)
    return F.gelu(gate, approximate="tanh" if act == "gelu_pytorch_tanh" else "none") * up
