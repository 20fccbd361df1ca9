"""Model families: the class that builds each supported architecture, and its checkpoint's names mapped to ours.

Every architecture in config.ARCHITECTURES is the shared decoder (models/llama.py, configured by ModelConfig)
unless OWN_CLASSES gives it its own; CHECKPOINT_NAMES renames, splits or transposes a family's tensors into
the layout of our modules before they are loaded.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from nanovllm.config import ARCHITECTURES, ModelConfig
from nanovllm.errors import UnsupportedArchitectureError
from nanovllm.models import gpt2, moe, phi3
from nanovllm.models.gpt2 import GPT2ForCausalLM
from nanovllm.models.llama import DecoderForCausalLM

CausalLM = DecoderForCausalLM | GPT2ForCausalLM  # what every engine calls: forward, compute_logits, ...

OWN_CLASSES: dict[str, type[nn.Module]] = {"GPT2LMHeadModel": GPT2ForCausalLM}

CHECKPOINT_NAMES: dict[str, Callable[[ModelConfig, dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = {
    "GPT2LMHeadModel": lambda cfg, tensors: gpt2.checkpoint_names(tensors),
    "Phi3ForCausalLM": phi3.checkpoint_names,
    "MixtralForCausalLM": lambda cfg, tensors: moe.checkpoint_names(tensors),  # block_sparse_moe, w1/w2/w3
}


def model_class(architecture: str) -> type[nn.Module]:
    """The class of an architecture; an unsupported one is a clear error that lists the supported ones."""
    if architecture not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {architecture!r} is not supported; nano-vLLM supports {', '.join(ARCHITECTURES)}"
        )
    return OWN_CLASSES.get(architecture, DecoderForCausalLM)


def build_model(cfg: ModelConfig) -> CausalLM:
    """The model for this config (with the current default device, e.g. 'meta' for loading)."""
    return model_class(cfg.architecture)(cfg)


def checkpoint_tensors(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under the names and in the layout of our modules."""
    convert = CHECKPOINT_NAMES.get(cfg.architecture)
    return tensors if convert is None else convert(cfg, tensors)


__all__ = ["CausalLM", "DecoderForCausalLM", "GPT2ForCausalLM", "build_model", "checkpoint_tensors", "model_class"]
