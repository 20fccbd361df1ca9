"""The C INT8 / INT4 linear kernels (nanovllm/kernels/quant_linear_cpu.c) against their PyTorch references.

The references (nanovllm.layers.quant_reference) quantize x exactly as the kernels do and compute each block's
integer dot product exactly, so a kernel may differ only by the float32 rounding of its sums: the tolerance is a
few ulps of sum |x| |w| per output. The references are in turn checked against x @ dequantized(W).T, within the
error that quantizing x in blocks of 32 can introduce.
"""

from __future__ import annotations

import pytest
import torch

from conftest import require
from nanovllm.kernels import cpu as kernels
from nanovllm.layers import quant_reference as ref

ROUNDING = 1e-6  # float32 sums of a few hundred blocks, relative to sum |x| |w|: measured ~4e-7 at worst


@pytest.fixture(autouse=True)
def c_kernel():
    require(kernels.quantized_kernels_unavailable(), "the quantized C kernels")


def int8_case(M, N, K, seed=0, bias=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen)
    qweight = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=gen)
    scale = torch.rand(N, generator=gen) / 50
    return x, qweight, scale, torch.randn(N, generator=gen) if bias else None


def int4_case(M, N, K, group_size, seed=0, bias=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen)
    qweight = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=gen)
    scales = torch.rand(N, K // group_size, generator=gen) / 50
    return x, qweight, scales, group_size, torch.randn(N, generator=gen) if bias else None


def assert_matches(out, expected, x, w, bias=None):
    """out == expected up to float32 rounding: each output within ROUNDING of its sum |x| |w| (+ |bias|)."""
    size = x.reshape(-1, x.shape[-1]).abs() @ w.abs().T
    if bias is not None:
        size = size + bias.abs()
    assert out.shape == expected.shape and out.dtype == torch.float32
    error = (out - expected).abs().reshape(size.shape)
    assert (error <= ROUNDING * size + 1e-30).all(), f"largest relative error {(error / size).max():.2e}"


def check_int8(x, qweight, scale, bias=None):
    out = kernels.int8_linear(x, qweight, scale, bias)
    assert_matches(
        out, ref.int8_linear_reference(x, qweight, scale, bias), x, ref.dequantize_int8(qweight, scale), bias
    )
    return out


def check_int4(x, qweight, scales, group_size, bias=None):
    out = kernels.int4_linear(x, qweight, scales, group_size, bias)
    expected = ref.int4_linear_reference(x, qweight, scales, group_size, bias)
    assert_matches(out, expected, x, ref.dequantize_int4(qweight, scales, group_size), bias)
    return out


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize(
    "N, K",
    [
        (1, 32),  # one row, one block
        (7, 96),  # rows no tile divides; a row shorter than a vector step, three blocks
        (33, 200),  # in not a multiple of 32: a partial last block of x
        (130, 1),  # one input
        (517, 640),  # enough weight for two threads (MIN_BYTES_PER_THREAD), with tails everywhere
    ],
)
def test_int8_matches_reference(threads, M, N, K):
    check_int8(*int8_case(M, N, K, seed=N + K + M, bias=M != 3))


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("N, groups", [(1, 1), (7, 3), (33, 5), (517, 6)])  # in = groups * group_size
def test_int4_matches_reference(threads, group_size, M, N, groups):
    check_int4(*int4_case(M, N, groups * group_size, group_size, seed=N + groups + M, bias=M != 3))


def test_int_extremes_and_zero_rows():
    """-128 and 127 weights, nibbles 0 and 15 (-8 and 7), x at +-127 after quantization, and rows of x all zero."""
    K, N = 256, 6
    x = torch.randn(5, K) * 1e3
    x[1] = 0  # a zero row: every block's scale 0, the output exactly the bias
    x[2, :32] = 0  # one zero block among others
    x[3] = torch.where(torch.arange(K) % 2 == 0, 1.0, -1.0) * 5  # every value at +-127
    q8 = torch.tensor([-128, 127]).repeat(N, K // 2).to(torch.int8)
    q8[1] = -128
    q8[2] = 127
    scale = torch.rand(N) + 0.5
    bias = torch.randn(N)
    out = check_int8(x, q8.contiguous(), scale, bias)
    torch.testing.assert_close(out[1], bias, rtol=0, atol=0)
    # 127 * 127 pairs and -128 * -127 pairs are where vpmaddubsw saturates int16 unless the kernel avoids it
    x_ext = torch.full((1, K), 5.0)
    x_ext[0, 1::2] = -5.0
    check_int8(x_ext, q8.contiguous(), scale)
    for packed in (0x00, 0xFF, 0x0F, 0xF0):  # nibbles 0 (-8) and 15 (7) in every combination
        for group_size in (32, 64, 128):
            q4 = torch.full((N, K // 2), packed, dtype=torch.uint8)
            scales = torch.rand(N, K // group_size) + 0.5
            out = check_int4(x, q4, scales, group_size, bias)
            torch.testing.assert_close(out[1], bias, rtol=0, atol=0)
            check_int4(x_ext, q4, scales, group_size)


def test_threads_do_not_change_the_result():
    """Each output is summed by one thread in one order: 1 and 2 threads agree bit for bit."""
    x, q8, scale, bias = int8_case(5, 777, 512, bias=True)
    x4, q4, scales, _, _ = int4_case(5, 777, 512, 64)
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append((kernels.int8_linear(x, q8, scale, bias), kernels.int4_linear(x4, q4, scales, 64)))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_leading_dimensions_and_out():
    x, q8, scale, bias = int8_case(6, 9, 64, bias=True)
    x3 = x.view(2, 3, 64)
    out = torch.full((2, 3, 9), float("nan"))
    assert kernels.int8_linear(x3, q8, scale, bias, out=out) is out
    torch.testing.assert_close(out.view(6, 9), kernels.int8_linear(x, q8, scale, bias), rtol=0, atol=0)
    x4, q4, scales, _, _ = int4_case(6, 9, 64, 32)
    assert kernels.int4_linear(x4.view(3, 2, 64), q4, scales, 32).shape == (3, 2, 9)
    assert kernels.int8_linear(torch.empty(0, 64), q8, scale).shape == (0, 9)  # no rows: nothing to do


def test_every_code_path_this_cpu_runs(monkeypatch, tmp_path):
    """The paths of older CPUs (AVX-512 BW, AVX2, portable C), each built here with its flags into a fresh cache."""
    native = kernels.quant_kernel_isa()  # the default build, checked by every other test
    monkeypatch.setenv("NANOVLLM_KERNEL_CACHE", str(tmp_path))
    others = {name: flags for name, flags in kernels.quant_kernel_paths().items() if name != native}
    try:
        for name, flags in others.items():
            monkeypatch.setenv("NANOVLLM_KERNEL_FLAGS", flags)
            kernels._load.cache_clear()
            assert kernels.quantized_kernels_unavailable() is None, name
            assert kernels.quant_kernel_isa() == name
            for M in (1, 3):
                check_int8(*int8_case(M, 9, 200, seed=M, bias=True))
                check_int8(*int8_case(M, 5, 96, seed=M))
                check_int4(*int4_case(M, 9, 384, 32, seed=M, bias=True))
                check_int4(*int4_case(M, 5, 96, 32, seed=M))  # a 48-byte row: a partial step on every path
                check_int4(*int4_case(M, 5, 128, 128, seed=M))
    finally:
        monkeypatch.undo()
        kernels._load.cache_clear()
    # one library per path, named apart from paged_attention_cpu's, and no half-written leftovers
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == ["quant_linear_cpu"] * len(others)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_reference_is_close_to_the_dequantized_product(kind):
    """The only error the references add to x @ W.T is x's rounding: at most d / 2 per value, d its block's scale."""
    K = 256
    x = torch.randn(4, K, generator=torch.Generator().manual_seed(3)) * torch.logspace(-2, 2, K)  # uneven blocks
    if kind == "int8":
        _, qweight, scale, bias = int8_case(4, 11, K, bias=True)
        out, w = ref.int8_linear_reference(x, qweight, scale, bias), ref.dequantize_int8(qweight, scale)
    else:
        _, qweight, scales, _, bias = int4_case(4, 11, K, 64, bias=True)
        out, w = ref.int4_linear_reference(x, qweight, scales, 64, bias), ref.dequantize_int4(qweight, scales, 64)
    _, d = ref.quantize_activations(x)
    exact = x.double() @ w.double().T + bias.double()
    bound = (d / 2).repeat_interleave(32, dim=1).double() @ w.abs().double().T  # sum over i of (d_i / 2) |w_i|
    error = (out.double() - exact).abs()
    assert (error <= bound * (1 + 1e-5) + ROUNDING * (x.abs() @ w.abs().T + bias.abs())).all()
    assert error.max() > 0  # quantizing x did change something: the bound is not vacuous


def test_activation_quantization():
    x = torch.tensor([[0.5, -1.0, 0.25, 2.54] + [0.0] * 28 + [0.0] * 32 + [3.0, -0.01]])  # K = 66: a partial block
    q, d = ref.quantize_activations(x)
    assert q.shape == (1, 96) and d.shape == (1, 3)
    torch.testing.assert_close(d, torch.tensor([[2.54 / 127, 0.0, 3.0 / 127]]))
    assert q[0, :4].tolist() == [25, -50, 12, 127]  # 0.5 / 0.02 = 25 exactly; 12.5 rounds half to even: 12
    assert (q[0, 32:64] == 0).all() and q[0, 64:66].tolist() == [127, 0] and (q[0, 66:] == 0).all()
    x = torch.randn(3, 1000) * 10
    q, d = ref.quantize_activations(x)
    assert q.abs().max() == 127 and (q.view(3, -1, 32).abs().amax(-1) == 127).all()  # every block uses its range
    error = (q.float().view(3, -1, 32) * d[..., None]).view(3, -1)[:, :1000] - x
    assert (error.abs() <= d.repeat_interleave(32, dim=1)[:, :1000] / 2 * (1 + 1e-5)).all()


def test_unpack_int4_order():
    qweight = torch.tensor([[0x21, 0xF0]], dtype=torch.uint8)  # low nibble first: inputs 1, 2, 0, 15
    assert ref.unpack_int4(qweight).tolist() == [[1 - 8, 2 - 8, 0 - 8, 15 - 8]]


def test_bad_inputs_raise():
    x, q8, scale, bias = int8_case(2, 5, 64, bias=True)
    _, q4, scales, _, _ = int4_case(2, 5, 64, 32)
    bad_int8 = [
        ((x.double(), q8, scale), "float32"),
        ((x.t().contiguous().t(), q8, scale), "contiguous"),  # a transposed view would be read wrongly: refused
        ((x[:, :32], q8, scale), "64 features"),
        ((x, q8.to(torch.int16), scale), "int8"),
        ((x, q8.view(torch.uint8), scale), "int8"),
        ((x, q8, scale[:4]), "shape"),
        ((x, q8, scale.double()), "float32"),
        ((x, q8[0], scale), "qweight"),
        ((x, q8, scale, bias[:3]), "bias"),
    ]
    for args, match in bad_int8:
        with pytest.raises(ValueError, match=match):
            kernels.int8_linear(*args)
    with pytest.raises(ValueError, match="out"):
        kernels.int8_linear(x, q8, scale, out=torch.empty(2, 6))
    bad_int4 = [
        ((x, q4, scales, 16), "group_size"),
        ((x, q4, scales, 128), "multiple of group_size"),
        ((x, q4, scales[:, :1].contiguous(), 32), "shape"),
        ((x, q4, scales.t().contiguous().t(), 32), "non-contiguous"),
        ((x, q4.view(torch.int8), scales, 32), "uint8"),
        ((x[:, :32], q4, scales, 32), "64 features"),
        ((x, q4, scales, 32, bias.double()), "bias"),
    ]
    for args, match in bad_int4:
        with pytest.raises(ValueError, match=match):
            kernels.int4_linear(*args)


def test_switched_off_or_unbuildable(monkeypatch, tmp_path):
    x, q8, scale, _ = int8_case(1, 4, 32)
    monkeypatch.setenv("NANOVLLM_C_KERNELS", "0")
    kernels._load.cache_clear()
    try:
        assert kernels.quantized_kernels_unavailable() == "NANOVLLM_C_KERNELS=0"
        with pytest.raises(RuntimeError, match="not available"):
            kernels.int8_linear(x, q8, scale)
        monkeypatch.setenv("NANOVLLM_C_KERNELS", "1")
        monkeypatch.setenv("CC", "false")  # a "compiler" that fails every build
        monkeypatch.setenv("NANOVLLM_KERNEL_CACHE", str(tmp_path))
        kernels._load.cache_clear()
        assert "quant_linear_cpu.c did not compile" in kernels.quantized_kernels_unavailable()
        assert list(tmp_path.iterdir()) == []
    finally:
        monkeypatch.undo()
        kernels._load.cache_clear()


def test_both_libraries_load_side_by_side():
    assert kernels.c_kernels_unavailable() is None and kernels.quantized_kernels_unavailable() is None
    assert kernels._load() is not kernels._load("quant_linear_cpu")
    assert set(kernels.QUANT_KERNEL_MAX_ROWS) == set(kernels.QUANT_KERNEL_PATHS)
    assert kernels.quant_kernel_max_rows() == kernels.QUANT_KERNEL_MAX_ROWS[kernels.quant_kernel_isa()] >= 1


# ---- dequantizing, for many rows of x ----------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("scheme, group_size", [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128)])
def test_dequantize_rows_is_bit_for_bit_the_pytorch_dequantization(threads, scheme, group_size):
    from nanovllm.layers.quantization import dequantize_int4, dequantize_int8

    N, K = 300, 640  # 770 KB of float32: enough for two threads
    if scheme == "int8":
        _, qweight, scales, _ = int8_case(1, N, K, seed=3)
        whole = dequantize_int8(qweight, scales)
    else:
        _, qweight, scales, _, _ = int4_case(1, N, K, group_size, seed=3)
        whole = dequantize_int4(qweight, scales, group_size)
    for o0, o1 in [(0, N), (7, 8), (100, 233), (N, N)]:
        out = torch.full((o1 - o0, K), float("nan"))
        kernels.dequantize_rows(scheme, qweight, scales, group_size, o0, o1, out)
        assert torch.equal(out, whole[o0:o1])


def test_dequantize_rows_refuses_rows_outside_the_weight_and_a_wrong_buffer():
    _, qweight, scale, _ = int8_case(1, 10, 64)
    with pytest.raises(ValueError, match="not within"):
        kernels.dequantize_rows("int8", qweight, scale, 0, 5, 11, torch.empty(6, 64))
    with pytest.raises(ValueError, match="shape"):
        kernels.dequantize_rows("int8", qweight, scale, 0, 0, 4, torch.empty(5, 64))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_many_rows_multiply_slice_by_slice_as_the_whole_dequantized_weight(monkeypatch, scheme):
    """QuantLinear past the kernel's row limit: W back to float32 a slice of rows at a time, into one buffer."""
    from nanovllm.layers import quantization
    from nanovllm.layers.linear import Linear

    torch.manual_seed(0)
    linear = Linear(256, 100, bias=True)
    layer = quantization.QuantLinear(linear, scheme, 32)
    x = torch.randn(kernels.quant_kernel_max_rows() + 5, 256)
    want = x @ layer.dequantized().T + layer.bias
    for floats in (1 << 18, 256 * 7, 100):  # one slice; 7 rows a slice, the last one short; a row over the buffer
        monkeypatch.setattr(quantization, "DEQUANTIZE_FLOATS", floats)
        monkeypatch.setattr(quantization._buffers, "floats", None, raising=False)
        got = layer(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
