"""Chapter 7's Triton INT8 / INT4 matmuls (nanovllm/kernels/triton/quant_matmul.py), checked against x times the
dequantized weight (nanovllm.layers.quant_reference) in float64, and QuantLinear's choice of them on a GPU.

Without a GPU the kernels run in Triton's interpreter on CPU tensors: small shapes only.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton decorates the kernels: run them on the CPU

from conftest import require  # noqa: E402
from nanovllm.kernels import triton as tk  # noqa: E402
from nanovllm.layers import quant_reference as ref  # noqa: E402
from nanovllm.layers import quantization as qz  # noqa: E402

pytestmark = pytest.mark.ch07
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# atol = rtol on outputs of size ~1: the kernel's float32 sums, then one rounding to x's dtype
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def triton_kernels():
    require(tk.triton_unavailable(), "the Triton kernels")


def case(m: int, n: int, k: int, dtype: torch.dtype, seed: int = 0):
    """x (m, k) in dtype, a weight (n, k) with rows of very different sizes and an outlier, a bias (n,)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.linspace(0.01, 0.2, n)[:, None]
    w[n // 2, k // 3] = 3.0  # one large weight: its row's (or group's) scale is large
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen)
    return x, w, bias


def expected(x: torch.Tensor, w_dequantized: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """float64 x @ W^T (+ b) with x exactly as the kernel gets it (already rounded to its dtype)."""
    y = x.double() @ w_dequantized.double().T
    return y if bias is None else y + bias.double()


def check(out: torch.Tensor, want: torch.Tensor, x: torch.Tensor) -> None:
    assert out.dtype == x.dtype and out.shape == want.shape
    tol = TOLERANCE[x.dtype]
    torch.testing.assert_close(out.double().cpu(), want, atol=tol, rtol=tol)


def on(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


# (M, N, K): one row (decode); rows that fill no tile exactly; two row tiles (M > 64) and a partial column tile
INT8_SHAPES = [(1, 64, 256), (17, 80, 200), (70, 48, 136)]
INT4_SHAPES = [(1, 64, 256), (17, 80, 128), (70, 48, 256)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m, n, k", INT8_SHAPES)
def test_int8_matches_the_dequantized_reference(m, n, k, dtype):
    x, w, bias = case(m, n, k, dtype)
    q, scale = qz.quantize_int8(w)
    want = expected(x, ref.dequantize_int8(q, scale), bias)
    check(tk.int8_matmul(*on(x, q, scale, bias), split_k=1), want, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("m, n, k", INT4_SHAPES)
def test_int4_matches_the_dequantized_reference(m, n, k, group_size, dtype):
    x, w, bias = case(m, n, k, dtype, seed=1)
    q, scales = qz.quantize_int4(w, group_size)
    want = expected(x, ref.dequantize_int4(q, scales, group_size), bias)
    check(tk.int4_matmul(*on(x, q, scales), group_size, *on(bias), split_k=1), want, x)


@pytest.mark.parametrize("split_k", [2, 3, 16])
def test_split_k_sums_its_parts(split_k):
    """K cut into parts summed afterwards (decode on a GPU): the same result, with and without a bias. 3 splits of
    INT8's 3 steps of K end on a partial step; 16 is more parts than steps (INT8's 3, INT4's 8 groups)."""
    x, w, bias = case(3, 40, 320, torch.float16, seed=2)
    q, scale = qz.quantize_int8(w)
    check(tk.int8_matmul(*on(x, q, scale, bias), split_k=split_k), expected(x, ref.dequantize_int8(q, scale), bias), x)
    q4, scales = qz.quantize_int4(w[:, :256], 32)
    x4 = x[:, :256].contiguous()
    want = expected(x4, ref.dequantize_int4(q4, scales, 32), None)
    check(tk.int4_matmul(*on(x4, q4, scales), 32, split_k=split_k), want, x4)


def test_choose_split_k():
    assert tk.quant_matmul.choose_split_k(16, 8, 132) == 4  # decode of 1024 outputs, K = 1024: capped by K's steps
    assert tk.quant_matmul.choose_split_k(16, 64, 132) == 9  # 16 tiles x 9 splits >= 132 SMs
    assert tk.quant_matmul.choose_split_k(200, 64, 132) == 1  # the tiles already fill the GPU
    assert tk.quant_matmul.choose_split_k(1, 1000, 132) == 16  # capped by max_splits
    assert tk.quant_matmul.choose_split_k(4, 64, 1) == 1  # the interpreter: one "SM"


def test_empty_batch_and_no_bias():
    x, w, _ = case(0, 32, 64, torch.float32)
    q, scale = qz.quantize_int8(w)
    assert tk.int8_matmul(*on(x, q, scale)).shape == (0, 32)
    x, w, _ = case(2, 32, 64, torch.float32)
    q, scale = qz.quantize_int8(w)
    check(tk.int8_matmul(*on(x, q, scale)), expected(x, ref.dequantize_int8(q, scale), None), x)


def test_bad_arguments_are_refused():
    x, w, bias = case(2, 32, 128, torch.float32)
    q, scale = on(*qz.quantize_int8(w))
    q4, scales = on(*qz.quantize_int4(w, 32))
    x, bias = on(x, bias)
    with pytest.raises(ValueError, match="group_size must be one of"):
        tk.int4_matmul(x, q4, scales, 16)
    with pytest.raises(ValueError, match=r"K \(96\) must be a multiple of group_size \(64\)"):
        tk.int4_matmul(x[:, :96].contiguous(), q4[:, :48].contiguous(), scales[:, :1].contiguous(), 64)
    with pytest.raises(ValueError, match="scales must be"):
        tk.int4_matmul(x, q4, scales[:, :2].contiguous(), 32)
    with pytest.raises(ValueError, match="x has 64 inputs per row, the weight 128"):
        tk.int8_matmul(x[:, :64].contiguous(), q, scale)
    with pytest.raises(ValueError, match="qweight must be torch.int8"):
        tk.int8_matmul(x, q4, scale)
    with pytest.raises(ValueError, match="x must be contiguous"):
        tk.int8_matmul(torch.randn(128, 2, device=DEVICE).t(), q, scale)
    with pytest.raises(ValueError, match="bias must have 32 values"):
        tk.int8_matmul(x, q, scale, bias[:5])
    with pytest.raises(ValueError, match="split_k must be"):
        tk.int8_matmul(x, q, scale, split_k=0)


def test_group_sizes_agree_with_the_cpu_kernels():
    from nanovllm.kernels import cpu

    assert tk.quant_matmul.INT4_GROUP_SIZES == cpu.INT4_GROUP_SIZES == qz.INT4_GROUP_SIZES


# ---- QuantLinear's choice of kernel --------------------------------------------------------------------------


def test_kernel_path_by_device():
    assert qz.kernel_path("cuda", 1) == "triton" and qz.kernel_path("cuda", 4096) == "triton"  # every batch size
    cpu_kernels = qz.cpu_kernels()
    if cpu_kernels is not None:  # the C kernels up to their row limit, then the dequantized matmul
        limit = cpu_kernels.quant_kernel_max_rows()
        assert qz.kernel_path("cpu", 1) == "c" and qz.kernel_path("cpu", limit + 1) == "dequantize"
    else:
        assert qz.kernel_path("cpu", 1) == "dequantize"


@pytest.mark.parametrize("scheme, group_size", [("int8", 32), ("int4", 64)])
def test_quant_linear_on_a_gpu_runs_the_triton_kernel(monkeypatch, scheme, group_size):
    """QuantLinear asks kernel_path as if its tensors were on a GPU; the kernel (interpreted on a CPU) is called,
    and the layer's output is x @ dequantized^T + b in x's own dtype, bf16, without the CPU kernels' rounding of x."""
    from nanovllm.layers.linear import Linear

    real_path, calls = qz.kernel_path, []
    monkeypatch.setattr(qz, "kernel_path", lambda device_type, rows: real_path("cuda", rows))
    for name in ("int8_matmul", "int4_matmul"):
        kernel = getattr(tk, name)
        monkeypatch.setattr(tk, name, lambda *a, _k=kernel, _n=name, **kw: calls.append(_n) or _k(*a, **kw))
    linear = Linear(128, 40, bias=True)
    _, w, bias = case(1, 40, 128, torch.float32, seed=3)
    with torch.no_grad():
        linear.weight.copy_(w)
        linear.bias.copy_(bias)
    layer = qz.QuantLinear(linear, scheme, group_size).to(DEVICE)
    x = torch.randn(2, 3, 128).to(torch.bfloat16).to(DEVICE)  # (B, T, in)
    y = layer(x)
    assert calls == [f"{scheme}_matmul"]
    assert y.shape == (2, 3, 40) and y.dtype == torch.bfloat16
    want = expected(x.reshape(6, 128), layer.dequantized(), layer.bias).view(2, 3, 40)
    torch.testing.assert_close(y.double().cpu(), want.cpu(), atol=2e-2, rtol=2e-2)


# ---- benchmarks/gpu_quant.py, the GPU script, kept from rotting on a CPU ----------------------------------------


def test_gpu_script_runs_every_section_in_the_interpreter(tmp_path, capsys):
    """--cpu-smoke: the checks (which must pass) and the timing of every format at every row count, on tiny shapes."""
    import json

    from benchmarks import gpu_quant
    from conftest import ROOT

    assert "-m benchmarks.gpu_quant" in (ROOT / "benchmarks" / "gpu.sh").read_text()
    if torch.cuda.is_available():
        pytest.skip("on a GPU, run python -m benchmarks.gpu_quant itself")
    with pytest.raises(SystemExit) as exit:
        gpu_quant.main([])
    assert exit.value.code == gpu_quant.NO_CUDA
    assert gpu_quant.main(["--cpu-smoke", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    checks = [r for r in results["rows"] if "vs x @ dequantized W" in r["check"]]
    assert len(checks) >= 4 and {r["result"] for r in checks} <= {"PASS", "n/a"}, capsys.readouterr().out
    formats = {"bf16", *gpu_quant.SCHEMES, gpu_quant.DEQUANTIZED}
    assert set(results["step_ms"]) == {"1", "8"} and formats <= set(results["step_ms"]["1"])
    bytes_ = results["weight_bytes"]
    assert bytes_["int8"] < 0.6 * bytes_["bf16"] and bytes_["int4-g32"] < 0.35 * bytes_["bf16"]
    assert "every check passed" in capsys.readouterr().out


COMPILE_FOR_SM90 = """
import os
os.environ["TRITON_INTERPRET"] = "0"  # compile for a GPU, not interpret
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from nanovllm.kernels.triton import quant_matmul as qm

for kernel, weight, extra in ((qm._int8_kernel, "*i8", {"BLOCK_K": 128}), (qm._int4_kernel, "*u8", {"GROUP": 32})):
    names = kernel.arg_names
    types = {"x_ptr": "*bf16", "w_ptr": weight, names[2]: "*fp32", "bias_ptr": "*fp32", "out_ptr": "*fp32"}
    consts = {"HAS_BIAS": True, "DOT_F32": False, "BLOCK_M": 16, "BLOCK_N": 64, **extra}
    signature = {n: types.get(n, "constexpr" if n in consts else "i32") for n in names}
    source = ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in consts.items()})
    assert "mma" in compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]  # on the tensor cores
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_for_a_gpu_without_one():
    """The interpreter runs the Python of a kernel, not Triton's compiler: this compiles both kernels (bf16, the split
    path with a bias) for an H100/H200 (sm_90) ahead of time, as far as PTX and ptxas, with no GPU needed."""
    import subprocess
    import sys

    from conftest import ROOT

    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception as e:  # a Triton without its NVIDIA backend
        pytest.skip(f"Triton's NVIDIA backend is not importable: {e}")
    command = [sys.executable, "-c", COMPILE_FOR_SM90]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_engine_with_the_triton_path_gives_the_dequantized_paths_tokens(monkeypatch, scheme):
    """The whole engine with every QuantLinear on the Triton kernel (as on a GPU; interpreted here) against the same
    engine on the dequantized float matmul: the same weights and the same float32 math, so the same greedy tokens.
    Qwen2 has biases on q, k and v."""
    from chapters.ch07_quantization import LLM
    from conftest import TINY_MODELS
    from nanovllm.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = [[1, 5, 9, 13], [2, 7]]
    llm = LLM(str(TINY_MODELS / "tiny-qwen2"), quantization=scheme)
    monkeypatch.setattr(qz, "kernel_path", lambda device_type, rows: "dequantize")
    want = [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]
    calls = []
    monkeypatch.setattr(qz, "kernel_path", lambda device_type, rows: calls.append(rows) or "triton")
    got = [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]
    assert calls and got == want
