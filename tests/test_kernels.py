import pytest
import torch

from sinkstream import kernels


def test_fast_cpu_matmul_restores_the_setting_and_keeps_fp32_accuracy():
    before = torch.backends.mkldnn.matmul.fp32_precision
    a, b = torch.randn(128, 576, dtype=torch.float64), torch.randn(576, 700, dtype=torch.float64)
    with kernels.fast_cpu_matmul() as on:
        assert on == kernels.onednn_is_fp32_exact()
        got = a.float() @ b.float()
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    rel = ((got.double() - a @ b).abs() / (a.abs() @ b.abs())).max()
    assert rel < 1e-5  # bf16 arithmetic would give ~1e-3


def test_default_mode_leaves_pytorch_choice(monkeypatch):
    monkeypatch.setenv("SINKSTREAM_CPU_MATMUL", "default")
    before = torch.backends.mkldnn.matmul.fp32_precision
    with kernels.fast_cpu_matmul() as on:
        assert not on
        assert torch.backends.mkldnn.matmul.fp32_precision == before


def test_bad_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("SINKSTREAM_CPU_MATMUL", "fastest")
    with pytest.raises(ValueError, match="SINKSTREAM_CPU_MATMUL"):
        with kernels.fast_cpu_matmul():
            pass

