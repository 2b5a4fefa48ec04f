"""GPU memory gauge: real CUDA memory when torch runs on CUDA, no series at all otherwise."""

from __future__ import annotations

import pytest

from daemon.ops.gpu import update_gpu_memory
from daemon.ops.metrics import Metrics

GAUGE = "regionwatch_gpu_memory_allocated_bytes"


def test_no_cuda_means_no_gpu_series():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("CUDA is in use in this process")
    m = Metrics()
    assert update_gpu_memory(m) == 0
    assert GAUGE.encode() + b"{" not in m.exposition()  # absent, not a made-up 0


def test_cuda_memory_is_reported():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    x = torch.empty(64 * 1024 * 1024, dtype=torch.uint8, device="cuda:0")  # 64 MiB
    m = Metrics()
    assert update_gpu_memory(m) == torch.cuda.device_count()
    value = m.registry.get_sample_value(GAUGE, {"device": "cuda:0"})
    assert value >= x.numel()
    del x
