"""Chapter 6 on the CPU: a decode step's layers replayed by one C call, the CPU's answer to a CUDA graph.

A CUDA graph records a step's kernel launches once and replays them without the host. On a CPU the host *is* the
machine, and what a step wastes is Python's and PyTorch's fixed cost per call: a decoder layer is a dozen calls
(norm, qkv, rotary, K/V store, attention, o, residual, norm, gate/up, SwiGLU, down, residual), ~15 us each before
any work. So chapter 6 records, once, what each layer's calls would be given (the weights' addresses, the kernels
that multiply them, the KV pool), and `decode_layers` (nanovllm/kernels/decode_ops_cpu.c) replays every layer of a
step in C: the same kernels on the same values in the same order, so the hidden states are the Python path's bit for
bit (tests/test_decode_step.py checks it), and a step costs one call instead of a dozen a layer.

Only a plain decode-only step goes this way: float32 on the CPU, the C attention backend, Llama's layer (pre-norms
in Llama's order, fused q/k/v and gate/up, SwiGLU, no q/k norms), every linear on a C kernel, one process, and no
forward hook on a layer (a hook must see its module run).
Everything else (prefill chunks, Gemma, Qwen3, mixtures of experts, tensor parallelism) keeps the module path.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from nanovllm.layers.linear import Linear
from nanovllm.layers.norm import RMSNorm
from nanovllm.layers.paged_attention import CDecodeAttention
from nanovllm.layers.quantization import QuantLinear
from nanovllm.models.fused import FusedMLP, FusedSelfAttention

_P, _I, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
KINDS = {"fp32": 0, "int8": 1, "int4": 2}


class CLinear(ctypes.Structure):
    _fields_ = [("weight", _P), ("scales", _P), ("bias", _P), ("kind", _I), ("in_", _I), ("out", _I), ("group", _I)]


class CLayer(ctypes.Structure):
    _fields_ = [
        ("input_norm", _P), ("post_attention_norm", _P),
        ("qkv", CLinear), ("o", CLinear), ("gate_up", CLinear), ("down", CLinear),
        ("k_cache", _P), ("v_cache", _P), ("scale", _F), ("softcap", _F), ("window", _I),
    ]  # fmt: skip


class CPlan(ctypes.Structure):
    _fields_ = [
        ("fp32_linear", _P), ("int8_linear", _P), ("int4_linear", _P), ("attention", _P),
        ("num_layers", _I), ("hidden", _I), ("heads", _I), ("kv_heads", _I), ("head_dim", _I), ("rotary_dim", _I),
        ("block_size", _I), ("num_blocks", _I), ("eps", _F), ("kv_bf16", _I),
    ]  # fmt: skip


def _address(function) -> int:
    return ctypes.cast(function, ctypes.c_void_p).value


def _linear(m: nn.Module) -> tuple[CLinear, list[torch.Tensor]] | str:
    """The plan's description of one linear layer (and the tensors it points into), or why it has none."""
    from nanovllm.kernels import cpu

    bias = getattr(m, "bias", None)
    bias_address = None if bias is None else bias.data_ptr()
    if type(m) is Linear:  # exactly: a tensor-parallel layer wraps its own (its all-reduce is not in the plan)
        if m.kernel is not cpu.fp32_linear or not m.weight_is_transposed:
            return "a float32 linear layer without chapter 6's C kernel"
        c = CLinear(m.weight.data_ptr(), None, bias_address, KINDS["fp32"], m.in_features, m.out_features)
        return c, [m.weight, *([bias] if bias is not None else [])]
    if type(m) is QuantLinear and cpu.quantized_kernels_unavailable() is None:
        c = CLinear(m.qweight.data_ptr(), m.scales.data_ptr(), bias_address, KINDS[m.scheme])
        c.in_, c.out, c.group = m.in_features, m.out_features, m.group_size
        return c, [m.qweight, m.scales, *([bias] if bias is not None else [])]
    return f"a {type(m).__name__} the plan cannot call"


class DecodeStepPlan:
    """Every layer of a model, recorded for `decode_layers`; call it on a decode-only step's hidden states."""

    def __init__(self, model: nn.Module, pool, max_rows: int):
        from nanovllm.kernels import cpu, decode_ops

        cfg, layers = model.config, model.model.layers
        self.max_rows, self.pool = max_rows, pool
        self.keep: list[torch.Tensor] = []  # every tensor the plan points into, alive as long as the plan
        self.layers = (CLayer * len(layers))()
        attention = layers[0].self_attn
        for i, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp
            c = self.layers[i]
            c.input_norm = layer.input_layernorm.weight.data_ptr()
            c.post_attention_norm = layer.post_attention_layernorm.weight.data_ptr()
            projections = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            for name, m in zip(("qkv", "o", "gate_up", "down"), projections):
                described = _linear(m)
                assert not isinstance(described, str)  # decode_step_unsupported checked every layer
                setattr(c, name, described[0])
                self.keep += described[1]
            c.k_cache, c.v_cache = pool.k[i].data_ptr(), pool.v[i].data_ptr()
            spec = attn.spec
            c.scale = attn.head_dim**-0.5 if spec is None or spec.scale is None else spec.scale
            c.window, c.softcap = (spec.window or 0, spec.softcap or 0.0) if spec is not None else (0, 0.0)
            self.keep += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
        quant = cpu._load("quant_linear_cpu")[0]
        bf16 = int(pool.k.dtype == torch.bfloat16)  # a bfloat16 pool: the step rounds K and V to it as it stores them
        self.plan = CPlan(
            _address(cpu._load("linear_cpu")[0].fp32_linear),
            quant and _address(quant.int8_linear),
            quant and _address(quant.int4_linear),
            _address(getattr(cpu._load()[0], "paged_decode_attention_bf16" if bf16 else "paged_decode_attention")),
            len(layers), cfg.hidden_size, attention.num_heads, attention.num_kv_heads, attention.head_dim,
            cfg.rotary_dim, pool.block_size, pool.k.shape[1], layers[0].input_layernorm.eps, bf16,
        )  # fmt: skip
        self.run = decode_ops._library().decode_layers
        self.watched = [m for layer in layers for m in layer.modules()]  # whose hooks ask for the module path

    def hooked(self) -> bool:
        """Whether a forward hook is on a layer or any of its modules (or on every module): a hook must see its
        module run, so such a step takes the module path (a profiler's, a test's injected fault, a breakdown's)."""
        if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return True
        return any(m._forward_hooks or m._forward_pre_hooks for m in self.watched)

    def covers(self, x: torch.Tensor, attn) -> bool:
        """Whether this step is one the plan replays: decodes only, few enough, float32, through this pool."""
        return (
            type(attn) is CDecodeAttention
            and attn.pool is self.pool
            and not attn.layout.prefills
            and x.shape[0] == 1
            and x.shape[1] == attn.num_decodes <= self.max_rows
            and x.dtype == torch.float32
            and attn.store_rows is None
            and attn.layout.slots.dtype == torch.int64
            and not self.hooked()
        )

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn) -> torch.Tensor:
        """x (1, N, E) hidden states of N decoding sequences -> (1, N, E) after every layer."""
        x = x.contiguous().clone()  # updated in place: the embedding's output is not ours to change
        cos, sin = cos.contiguous(), sin.contiguous()
        slots, tables, lens = attn.layout.slots.contiguous(), attn.tables, attn.context_lens
        error = self.run(
            ctypes.byref(self.plan), self.layers, x.data_ptr(), cos.data_ptr(), sin.data_ptr(),
            slots.data_ptr(), tables.data_ptr(), lens.data_ptr(), x.shape[1], tables.shape[1], torch.get_num_threads(),
        )  # fmt: skip
        if error == 1:
            raise IndexError("a slot, context length or block id is out of range of the block tables or the pool")
        if error:
            raise MemoryError("the C decode step ran out of memory")
        return x


def decode_step_unsupported(model: nn.Module) -> str | None:
    """None when every layer of `model` is one `decode_layers` can replay; otherwise why not (the first reason)."""
    from nanovllm.kernels import cpu, decode_ops

    why = decode_ops.decode_ops_unavailable() or cpu.c_kernels_unavailable() or cpu.linear_kernel_unavailable()
    if why:
        return why
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not len(layers) or not hasattr(model, "rope"):
        return f"{type(model).__name__} is not a Llama-style decoder"
    eps = {m.eps for m in model.modules() if isinstance(m, RMSNorm)}
    if len(eps) != 1:
        return "the norms do not share one epsilon"
    for layer in layers:
        if getattr(layer, "sandwich_norms", True) or not isinstance(layer.self_attn, FusedSelfAttention):
            return "a layer is not Llama's (pre-norms, fused q/k/v)"
        mlp = layer.mlp
        if layer.self_attn.rotary_kernel is None or not isinstance(mlp, FusedMLP) or mlp.silu_kernel is None:
            return "a layer's rotary or SwiGLU has no C kernel (q/k norms, GeGLU, a mixture of experts)"
        if layer.input_layernorm.kernel is None or layer.post_attention_layernorm.kernel is None:
            return "a layer's norms have no C kernel (Gemma's 1 + weight)"
        for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
            if isinstance(described := _linear(m), str):
                return described
    return None


def use_decode_step_(model: nn.Module, pool, enabled: bool, max_rows: int) -> bool:
    """Give the model a DecodeStepPlan over `pool` for decode-only steps of up to max_rows sequences where every
    layer can be replayed (decode_step_unsupported), or take it away. Returns whether it has one."""
    if not hasattr(model, "decode_plan"):  # not a DecoderForCausalLM (GPT-2): nothing to replay
        return False
    replayable = enabled and decode_step_unsupported(model) is None
    model.decode_plan = DecodeStepPlan(model, pool, max_rows) if replayable else None
    return replayable


def decode_step_rows(model: nn.Module) -> int:
    """The most sequences a replayed step takes: as many as every layer's module path sends to its C kernel."""
    from nanovllm.kernels import cpu

    quantized = any(isinstance(m, QuantLinear) for m in model.modules())
    return min(cpu.LINEAR_KERNEL_MAX_ROWS, cpu.quant_kernel_max_rows()) if quantized else cpu.LINEAR_KERNEL_MAX_ROWS
