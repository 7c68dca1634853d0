"""The run's device: ``device`` resolves as documented, and a GPU is made deterministic before use."""

from __future__ import annotations

import pytest
import torch

from fedlt_app import task


def test_cuda_is_asked_for_repeatable_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    attention = (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
                 torch.backends.cuda.mem_efficient_sdp_enabled())
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        task.make_cuda_deterministic()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()  # a missing kernel warns, never stops a run
        # the fused attention kernels' backward ignores the flag under warn_only: only the plain one is left
        assert not any((torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
                        torch.backends.cuda.mem_efficient_sdp_enabled()))
        assert torch.backends.cuda.math_sdp_enabled()
        assert task.os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # a user's own setting is kept
        task.make_cuda_deterministic()
        assert task.os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        for enable, was in zip((torch.backends.cuda.enable_cudnn_sdp, torch.backends.cuda.enable_flash_sdp,
                                torch.backends.cuda.enable_mem_efficient_sdp), attention):
            enable(was)


def test_only_a_cuda_device_changes_the_global_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(task, "make_cuda_deterministic", lambda: calls.append("cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert task.resolve_device("cpu") == torch.device("cpu")
    assert task.resolve_device("auto") == torch.device("cpu")
    assert calls == []
    with pytest.raises(ValueError, match="device: 'cuda' was asked for but no CUDA device is visible"):
        task.resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert task.resolve_device("auto") == torch.device("cuda")
    assert task.resolve_device("cuda") == torch.device("cuda")
    assert calls == ["cuda", "cuda"]
