"""GPU memory in use, for ``regionwatch_gpu_memory_allocated_bytes{device="cuda:N"}``.

Read from torch when torch is already loaded and has initialised CUDA; nothing otherwise (it
never imports torch, so a CPU/ONNX deployment stays light, and a CPU host exports no GPU series
rather than a misleading zero).

Example:
    >>> from daemon.ops.metrics import Metrics
    >>> m = Metrics()
    >>> update_gpu_memory(m)  # on a CPU-only host
    0
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger(__name__)


def update_gpu_memory(metrics) -> int:
    """Set the GPU memory gauge per CUDA device; returns how many devices were updated (0 on CPU)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return 0
    try:
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return 0
        n = torch.cuda.device_count()
        for i in range(n):
            metrics.gpu_memory.labels(device=f"cuda:{i}").set(torch.cuda.memory_allocated(i))
        return n
    except Exception as e:  # metrics must never take the daemon down
        log.debug("GPU memory metric unavailable: %s", e)
        return 0
