"""Small tensors of host values on any device, without a host synchronisation.

``torch.tensor(values, device="cuda")`` copies from pageable memory with a blocking copy, which
waits for the stream (``torch.cuda.set_sync_debug_mode`` reports it). Copying a fresh CPU tensor
with ``non_blocking=True`` does not wait: CUDA stages pageable memory before the call returns, so
the source may go at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def host_tensor(
    values: Sequence, device: torch.device | str, dtype: torch.dtype | None = None
) -> Tensor:
    """``torch.tensor(values, dtype=dtype)`` on ``device``, copied without waiting."""
    out = torch.tensor(values, dtype=dtype)
    return out if out.device == torch.device(device) else out.to(device, non_blocking=True)
