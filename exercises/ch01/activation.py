"""Exercises for ch01: your version of nanovllm.layers.activation.

Fill in each function marked with a task; the docstring says what it computes.
Check your work with: pytest --impl=exercises -m ch01 -k "task3"
"""

import torch
import torch.nn.functional as F
from nanovllm.layers.activation import gated_activation  # the rest of the file, as given


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
    raise NotImplementedError("ch01 task 3: the SwiGLU gate silu(gate) * up")
