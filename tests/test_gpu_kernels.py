"""benchmarks/gpu_kernels.py, the GPU check of chapter 5's kernels, on a CPU: its ratios, verdicts and table, and each
of its sections run end to end in Triton's interpreter on small shapes, with a stand-in for the GPU timer."""

from __future__ import annotations

import pytest
import torch

from benchmarks import gpu_kernels as gk
from conftest import ROOT, require
from nanovllm.kernels import triton as tk

pytestmark = pytest.mark.ch05


def test_peak_bandwidth_by_device_name_and_the_override():
    assert gk.peak_hbm("NVIDIA H200", env={})[0] == pytest.approx(4.8e12)
    assert gk.peak_hbm("NVIDIA H100 80GB HBM3", env={})[0] == pytest.approx(3.35e12)  # the SXM part
    assert gk.peak_hbm("NVIDIA H100 PCIe", env={})[0] == pytest.approx(2.0e12)
    assert gk.peak_hbm("NVIDIA A100-SXM4-80GB", env={})[0] == pytest.approx(2.039e12)
    assert gk.peak_hbm("NVIDIA L40S", env={})[0] == pytest.approx(0.864e12)  # not the L4's
    peak, why = gk.peak_hbm("NVIDIA GH200 480GB", env={})  # not the H200's: its memory decides
    assert peak is None and gk.PEAK_ENV in why
    assert gk.peak_hbm("Some Future GPU", env={gk.PEAK_ENV: "2.5"})[0] == pytest.approx(2.5e12)


def test_target_rows_are_ratios_with_their_verdicts():
    assert gk.kv_bytes(64, 4096, 8, 128, 2) == 2 * 64 * 4096 * 8 * 128 * 2  # K and V, bf16
    assert gk.decode_row(0.25, 0.75, 64, 1024).result == "PASS"  # exactly 3x
    assert gk.decode_row(0.25, 0.74, 64, 1024).result == "FAIL"
    nbytes = gk.kv_bytes(64, 4096, 8, 128, 2)  # 1.07 GB
    fast = gk.bandwidth_row(nbytes / 3.0e12 * 1e3, nbytes, 4.8e12, "4.8 TB/s", 64, 4096)  # 3.0 of 4.8 TB/s: 62%
    assert fast.result == "PASS" and "62%" in fast.measured
    assert gk.bandwidth_row(nbytes / 2.0e12 * 1e3, nbytes, 4.8e12, "4.8 TB/s", 64, 4096).result == "FAIL"
    assert gk.bandwidth_row(1.0, nbytes, None, "no peak known", 64, 4096).result == "n/a"
    assert gk.split_k_row(0.05, 0.1, 17, 8192).result == "PASS" and "17 splits" in gk.split_k_row(1, 1, 17, 1).check
    table = gk.format_table([gk.decode_row(0.1, 0.5, 64, 1024), gk.split_k_row(0.1, 0.15, 17, 8192)])
    lines = table.splitlines()
    assert len(lines) == 4 and all(line.count("|") == 5 for line in lines)
    assert "5.00x" in lines[2] and "**PASS**" in lines[2] and "**FAIL**" in lines[3]


def test_without_cuda_it_exits_with_one_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exit:
        gk.main([])
    assert exit.value.code == gk.NO_CUDA and "\n" not in gk.NO_CUDA


def test_gpu_sh_runs_it():
    assert "-m benchmarks.gpu_kernels" in (ROOT / "benchmarks" / "gpu.sh").read_text()


def test_every_section_runs_in_the_interpreter(monkeypatch):
    """The script's own code paths on small shapes: the correctness checks pass, and each timing section builds its
    inputs, calls the kernels and the PyTorch paths, and makes its row. Only the GPU timer is replaced."""
    require(tk.triton_unavailable(), "the Triton kernels")
    if torch.cuda.is_available():
        pytest.skip("on a GPU, run python -m benchmarks.gpu_kernels itself")
    calls = []
    monkeypatch.setattr(gk, "DEVICE", "cpu")
    monkeypatch.setattr(gk, "bench_ms", lambda fn: calls.append(fn()) or 1.0)
    rows = gk.correctness_rows(tk, torch.float16, lengths=(1, 16, 17, 300), cases=((1, 1), (40, 40), (300, 20)))
    assert [r.result for r in rows] == ["PASS"] * 4, gk.format_table(rows)
    gen = torch.Generator().manual_seed(0)
    rows, results = gk.decode_vs_torch(tk, torch.float16, gen, batch=2, context=32)
    assert results["outputs_agree"] and [r.result for r in rows] == ["FAIL", "info"]  # 1 ms / 1 ms is not 3x
    rows, results = gk.bandwidth(tk, torch.float16, gen, "NVIDIA H200", batch=2, context=32)
    assert results["kv_bytes"] == gk.kv_bytes(2, 32, gk.KV_HEADS, gk.HEAD_DIM, 2) and rows[0].result == "FAIL"
    rows, results = gk.split_k(tk, torch.float16, gen, 132, batch=1, context=512)
    assert results["num_splits"] == 2 and rows[0].result == "FAIL"  # 512 tokens: two splits of 256
    assert len(calls) == 6 and all(isinstance(out, torch.Tensor) for out in calls)
