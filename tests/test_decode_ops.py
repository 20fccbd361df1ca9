"""Chapter 6's C kernels for the small operations of a decode step (nanovllm/kernels/decode_ops_cpu.c), checked the
llm.c way against their PyTorch forms: rotary exactly, RMSNorm and SwiGLU to float32 rounding; then that the engine
gives them only the modules whose computation they reproduce, and that a decode step really calls them (chapter 6
against chapter 5's greedy tokens on every family: tests/test_linear_kernel.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_MODELS, require
from nanovllm.kernels import decode_ops
from nanovllm.layers.norm import RMSNorm, rms_norm
from nanovllm.layers.rotary import apply_partial_rotary, rope_cos_sin, rope_inv_freq
from nanovllm.models.fused import FusedMLP, FusedSelfAttention
from nanovllm.sampling_params import SamplingParams


@pytest.fixture(autouse=True)
def c_kernels():
    require(decode_ops.decode_ops_unavailable(), "the C decode-step kernels")


@pytest.mark.parametrize("shape", [(1, 1, 768), (3, 5, 384), (2, 100), (4, 7)])
def test_rms_norm_matches_torch(shape):
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(shape, generator=gen) * 3, torch.randn(shape[-1], generator=gen)
    got, want = decode_ops.rms_norm(x, w, 1e-5), rms_norm(x, w, 1e-5)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    assert decode_ops.rms_norm(x, w, 1e-5, out=x) is x and torch.equal(x, got)  # in place: the same values


@pytest.mark.parametrize("rotary_dim", [64, 32, 16])  # full, half (Phi-3's partial rotary), a quarter
def test_rotary_turns_q_and_k_of_a_fused_row_exactly(rotary_dim):
    """One call turns q's heads and k's side by side at the start of each row, leaving v; the same bits as torch."""
    Hq, Hkv, D, B, T = 4, 2, 64, 2, 3
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(B, T, (Hq + 2 * Hkv) * D, generator=gen)
    positions = torch.tensor([[5, 6, 7], [0, 100, 2047]])
    cos, sin = rope_cos_sin(positions, rope_inv_freq(rotary_dim, 10000.0), torch.float32)  # (B, T, R)
    q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
    want_q = apply_partial_rotary(q.reshape(B, T, Hq, D), cos, sin)
    want_k = apply_partial_rotary(k.reshape(B, T, Hkv, D), cos, sin)
    want_v = v.clone()
    assert decode_ops.rotary_(qkv, cos, sin, Hq + Hkv, D) is qkv
    assert torch.equal(q.reshape(B, T, Hq, D), want_q) and torch.equal(k.reshape(B, T, Hkv, D), want_k)
    assert torch.equal(v, want_v)


@pytest.mark.parametrize("shape", [(1, 1, 4096), (3, 2, 200), (5, 2)])
def test_silu_mul_matches_torch(shape):
    gate_up = torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    got = decode_ops.silu_mul(gate_up)
    torch.testing.assert_close(got, F.silu(gate) * up, rtol=3e-6, atol=1e-6)


def test_bad_inputs_raise():
    x, w = torch.randn(2, 8), torch.randn(8)
    with pytest.raises(ValueError, match="x must be a contiguous torch.float32"):
        decode_ops.rms_norm(x.double(), w, 1e-5)
    with pytest.raises(ValueError, match="weight must have shape"):
        decode_ops.rms_norm(x, torch.randn(7), 1e-5)
    with pytest.raises(ValueError, match="non-contiguous"):
        decode_ops.rms_norm(torch.randn(8, 2).t(), w, 1e-5)
    cos = torch.randn(2, 8)
    with pytest.raises(ValueError, match="even width"):
        decode_ops.rotary_(torch.randn(2, 32), cos[:, :7].contiguous(), cos[:, :7].contiguous(), 2, 8)
    with pytest.raises(ValueError, match="one row"):
        decode_ops.rotary_(torch.randn(3, 32), cos, cos, 2, 8)  # 3 rows of x, 2 of cos
    with pytest.raises(ValueError, match="heads"):
        decode_ops.rotary_(torch.randn(2, 32), cos, cos, 5, 8)  # 5 heads of 8 do not fit 32
    with pytest.raises(ValueError, match="even"):
        decode_ops.silu_mul(torch.randn(2, 7))


def test_the_engine_gives_kernels_only_where_they_compute_the_same():
    """Llama: every norm, attention and MLP; Gemma's (1 + weight) norms and GeGLU, Qwen3's q/k norms: none;
    chapter 5 (its pinned torch matmuls): none."""
    from chapters.ch05_triton_attention import LLM as Chapter5
    from nanovllm import LLM

    def kernels(llm):
        modules = list(llm.model.modules())
        return (
            [m.kernel is not None for m in modules if isinstance(m, RMSNorm)],
            [m.rotary_kernel is not None for m in modules if isinstance(m, FusedSelfAttention)],
            [m.silu_kernel is not None for m in modules if isinstance(m, FusedMLP)],
        )

    norms, attentions, mlps = kernels(LLM(str(TINY_MODELS / "tiny-llama"), block_size=4))
    assert norms and attentions and mlps and all(norms + attentions + mlps)
    norms, attentions, mlps = kernels(LLM(str(TINY_MODELS / "tiny-gemma"), block_size=4))
    assert not any(norms) and all(attentions) and not any(mlps)
    norms, attentions, _ = kernels(LLM(str(TINY_MODELS / "tiny-qwen3"), block_size=4))
    assert all(norms) and not any(attentions)
    norms, attentions, mlps = kernels(Chapter5(str(TINY_MODELS / "tiny-llama"), block_size=4))
    assert not any(norms + attentions + mlps) and not attentions  # chapter 5 fuses no projections either


def test_a_decode_step_calls_them_and_a_prefill_does_not(monkeypatch):
    """Decode steps (one row a sequence) go to the C kernels; a long prompt's rows (past the row limit) to torch.
    Same tokens as with the kernels taken away."""
    from nanovllm import LLM
    from nanovllm.models.fused import use_decode_kernels_

    llm = LLM(str(TINY_MODELS / "tiny-llama"), block_size=4)
    llm.model.decode_plan = None  # the module path (a replayed step calls them from C: tests/test_decode_step.py)
    calls = {"rms_norm": [], "rotary": [], "silu_mul": []}
    library = decode_ops._library()

    rows_at = {"rms_norm": 3, "rotary": 3, "silu_mul": 2}  # where each function takes its number of rows

    class Counting:
        def __getattr__(self, name):
            fn = getattr(library, name)
            return lambda *args: calls[name].append(args[rows_at[name]]) or fn(*args)

    monkeypatch.setattr(decode_ops, "_library", Counting)
    params = SamplingParams(max_tokens=6, ignore_eos=True, temperature=0)
    prompt = [1] + [(7 * j) % 300 + 3 for j in range(80)]  # 81 rows: past the 64-row limit
    got = llm.generate([prompt], params, use_tqdm=False)[0]["token_ids"]
    layers = llm.config.num_layers
    assert len(calls["rotary"]) == 5 * layers and set(calls["rotary"]) == {1}  # 5 decode steps of one row each
    assert len(calls["silu_mul"]) == 5 * layers and len(calls["rms_norm"]) == 5 * (2 * layers + 1)
    assert use_decode_kernels_(llm.model, False, 64) is False
    assert llm.generate([prompt], params, use_tqdm=False)[0]["token_ids"] == got
