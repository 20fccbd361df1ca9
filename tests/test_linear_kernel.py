"""Chapter 6's C linear kernel for decode-sized rows (nanovllm/kernels/linear_cpu.c), the llm.c way: correct first.

The kernel computes x @ W^T from the engine's W^T layout, summing in another order than PyTorch: checked against
torch in float64 within float32 rounding (a few ulps of sum |x| |w| per output) over odd shapes and every row count
up to past its row limit; then in the layers (only few rows go to it) and in the engine (chapter 6 on a CPU uses it
and gives chapter 5's greedy tokens on every family).
"""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, TINY_MODELS, require
from nanovllm.kernels import cpu as kernels
from nanovllm.layers.linear import Linear, use_linear_kernel_
from nanovllm.sampling_params import SamplingParams

ROUNDING = 1e-6  # float32 sums of up to ~2000 products, relative to sum |x| |w|: measured ~2e-7 at worst


@pytest.fixture(autouse=True)
def c_kernel():
    require(kernels.linear_kernel_unavailable(), "the C linear kernel")


def case(M, K, N, seed=0, bias=False):
    gen = torch.Generator().manual_seed(seed)
    x, w_t = torch.randn(M, K, generator=gen), torch.randn(K, N, generator=gen)
    return x, w_t, torch.randn(N, generator=gen) if bias else None


def check(x, w_t, bias=None, out=None):
    """The kernel's output equals torch's float64 product up to float32 rounding."""
    got = kernels.fp32_linear(x, w_t, bias, out)
    expected = x.double() @ w_t.double() + (0 if bias is None else bias.double())
    size = x.double().abs() @ w_t.double().abs() + (0 if bias is None else bias.double().abs())
    assert got.shape == expected.shape and got.dtype == torch.float32
    error = (got.double() - expected).abs()
    assert (error <= ROUNDING * size + 1e-30).all(), f"largest relative error {(error / size).max():.2e}"
    return got


ROWS = sorted({1, 2, 3, 4, 5, 8, 10, 15, 16, 17, 33, kernels.LINEAR_KERNEL_MAX_ROWS})  # passes, blocks and tails


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize(
    "K, N",
    [
        (1, 1),  # one weight
        (7, 5),  # fewer rows than a step (8) and columns than a vector: the scalar tails only
        (8, 16),  # exactly one step of one vector
        (9, 17),  # one step and one row over; a vector and one column over
        (100, 129),  # rows and columns no step or vector divides
        (24, 5000),  # more columns than a chunk holds: several chunks, the last one partial
        (600, 300),  # enough weight for two threads (128 KB each), with tails
    ],
)
def test_matches_torch(threads, M, K, N):
    check(*case(M, K, N, seed=M + K + N, bias=M % 2 == 1))


def test_leading_dimensions_out_no_rows_and_no_inputs():
    x, w_t, bias = case(6, 40, 9, bias=True)
    out = torch.full((2, 3, 9), float("nan"))
    assert kernels.fp32_linear(x.view(2, 3, 40), w_t, bias, out=out) is out
    torch.testing.assert_close(out.view(6, 9), kernels.fp32_linear(x, w_t, bias), rtol=0, atol=0)
    check(x, w_t, out=torch.full((6, 9), float("nan")))  # out's old values are not read
    assert kernels.fp32_linear(torch.empty(0, 40), w_t).shape == (0, 9)
    assert (kernels.fp32_linear(torch.empty(3, 0), torch.empty(0, 9), bias) == bias).all()  # in = 0: the bias


def test_bad_inputs_raise():
    x, w_t, bias = case(2, 16, 8)
    for args, match in [
        ((x.double(), w_t), "x must be a contiguous torch.float32"),
        ((x, w_t.t()), "w_t must be a contiguous"),
        ((x, w_t[:, :4]), "w_t must be a contiguous"),
        ((x[:, :8], w_t), "16 features"),
        ((x.t().contiguous().t(), w_t), "x must be a contiguous"),
        ((x, w_t.view(-1)), "w_t must be"),
        ((x, w_t, torch.zeros(7)), "bias must have shape"),
        ((x, w_t, None, torch.empty(2, 7)), "out must have shape"),
    ]:
        with pytest.raises(ValueError, match=match):
            kernels.fp32_linear(*args)


def test_every_vector_width_this_cpu_builds(monkeypatch, tmp_path):
    """One source, vectors as wide as the flags allow: the AVX-512, AVX2 and portable builds of the quantized paths."""
    monkeypatch.setenv("NANOVLLM_KERNEL_CACHE", str(tmp_path))
    lanes = {"avx512vnni": 16, "avx512bw": 16, "avx2": 8, "scalar": 4}  # floats a vector holds (SSE / NEON: 4)
    try:
        for name, flags in kernels.quant_kernel_paths().items():
            monkeypatch.setenv("NANOVLLM_KERNEL_FLAGS", flags)
            kernels._load.cache_clear()
            assert kernels.linear_kernel_unavailable() is None, name
            assert kernels._load("linear_cpu")[0].dense_linear_lanes() == lanes[name]
            for M in (1, 3, 17):
                check(*case(M, 100, 129, seed=M, bias=True))
                check(*case(M, 9, 5000, seed=M))
    finally:
        monkeypatch.undo()
        kernels._load.cache_clear()


def test_the_layer_sends_few_rows_to_the_kernel_and_more_to_torch(monkeypatch):
    layer = Linear(40, 24, bias=True)
    layer.transpose_weight_()
    calls = []

    def spy(x, w_t, bias):
        calls.append(x.shape)
        return kernels.fp32_linear(x, w_t, bias)

    assert use_linear_kernel_(layer, None) == "c" and layer.kernel is kernels.fp32_linear
    layer.kernel = spy
    limit = kernels.LINEAR_KERNEL_MAX_ROWS
    for rows in (1, limit, limit + 1):
        x = torch.randn(1, rows, 40)
        torch.testing.assert_close(layer(x), x @ layer.weight + layer.bias)
    x = torch.randn(3, 80)[:, ::2]  # not contiguous: torch's matmul
    torch.testing.assert_close(layer(x), x @ layer.weight + layer.bias)
    assert calls == [(1, 1, 40), (1, limit, 40)]
    assert use_linear_kernel_(layer, "torch") == "torch" and layer.kernel is None and layer.kernel_max_numel < 0


def test_the_kernel_is_refused_where_it_cannot_run(monkeypatch):
    layer = Linear(8, 8)
    with pytest.raises(ValueError, match="transposed"):
        use_linear_kernel_(layer, "c")  # an (out, in) weight: not what the kernel reads
    assert use_linear_kernel_(layer, None) == "torch"
    layer.transpose_weight_()
    with pytest.raises(ValueError, match="CPU"):
        use_linear_kernel_(layer, "c", "cuda")
    with pytest.raises(ValueError, match="float32"):
        use_linear_kernel_(layer.to(torch.bfloat16), "c")
    layer.float()
    monkeypatch.setenv("NANOVLLM_C_KERNELS", "0")
    kernels._load.cache_clear()
    try:
        assert use_linear_kernel_(layer, None) == "torch" and layer.kernel is None
        with pytest.raises(ValueError, match="NANOVLLM_C_KERNELS=0"):
            use_linear_kernel_(layer, "c")
    finally:
        monkeypatch.undo()
        kernels._load.cache_clear()


def greedy(n):
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


PROMPTS = [[1] + [(13 * i + 5 * j) % 380 + 3 for j in range(n)] for i, n in enumerate([5, 11, 3, 17, 8, 2, 21, 9])]


@pytest.mark.parametrize("family", FAMILIES)
def test_chapter6_with_the_kernel_gives_chapter5s_tokens(family):
    """Decodes of 1 to 8 sequences (the kernel) and prompts (torch's matmul): chapter 5's greedy tokens exactly."""
    from chapters.ch05_triton_attention import LLM as Chapter5
    from chapters.ch06_cuda_graphs import LLM as Chapter6

    path = str(TINY_MODELS / family)
    ours, theirs = Chapter6(path, block_size=4), Chapter5(path, block_size=4)
    assert ours.linear_kernel == "c" and theirs.linear_kernel == "torch"
    params = [greedy(8 + i % 3) for i in range(len(PROMPTS))]
    for n in (1, len(PROMPTS)):
        got = ours.generate(PROMPTS[:n], params[:n], use_tqdm=False)
        want = theirs.generate(PROMPTS[:n], params[:n], use_tqdm=False)
        assert [o["token_ids"] for o in got] == [o["token_ids"] for o in want], n


def test_quantized_layers_keep_their_kernels():
    """Chapter 7: the quantized decoder layers are QuantLinear (their own kernels); a float lm_head gets this one."""
    from nanovllm import LLM
    from nanovllm.layers.quantization import QuantLinear

    llm = LLM(str(TINY_MODELS / "tiny-llama"), quantization="int8", quantize_lm_head=False)
    layers = list(llm.model.modules())
    assert llm.linear_kernel == "c" and any(isinstance(m, QuantLinear) for m in layers)
    assert [m for m in layers if isinstance(m, Linear)] == [llm.model.lm_head]
    assert llm.model.lm_head.kernel is kernels.fp32_linear
    assert all(not hasattr(m, "kernel") for m in layers if isinstance(m, QuantLinear))
