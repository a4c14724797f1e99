"""Scratch buffers kept between increments, owned by the statistic that uses them.

The per-element path writes an increment's sums of squares into a buffer (``_blocks``) and
checks large parameters in chunks through another (``_guard``); allocating them afresh at every
increment would cost page faults and fresh model-sized memory each time. Each ``ElementMoments``
keeps its own ``Scratch``: two statistics (two models, or a model and its copy) never share a
buffer, and nothing of it lives at module level.
"""

from __future__ import annotations

import torch


class Scratch:
    """One buffer per use, dtype and device, grown to the largest size asked for."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def take(self, use: str, size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``size`` elements of the ``use`` buffer (``"blocks"``, ``"guard"``): uses never overlap,
        so a buffer that one holds may be read while another is written."""
        key = (use, dtype, torch.device(device))
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < size:
            buffer = self._buffers[key] = torch.empty(size, dtype=dtype, device=device)
        return buffer[:size]
