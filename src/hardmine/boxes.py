"""Box geometry: IoU, IoF, centres and input validation.

Boxes are ``xyxy`` in absolute pixels, floating point (DESIGN.md). Quality matrices are ``[G, N]``:
the first argument's boxes by the second's.
"""

from __future__ import annotations

import torch
from torch import Tensor

_EPS = 1e-6


def check_boxes(boxes: Tensor, name: str) -> None:
    """Raise ``ValueError`` unless ``boxes`` is a finite floating ``[N, 4]`` tensor.

    Zero-area and out-of-image boxes are valid input (they match nothing); only non-finite values,
    wrong shapes and integer dtypes are errors.
    """
    if not isinstance(boxes, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(boxes).__name__}")
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name}: expected shape [N, 4], got {list(boxes.shape)}")
    if not boxes.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {boxes.dtype}")
    if boxes.numel() and not bool(torch.isfinite(boxes).all()):
        raise ValueError(f"{name}: contains NaN or infinite coordinates")


def check_finite(values: Tensor, name: str) -> None:
    """Raise ``ValueError`` if a floating tensor (losses, scores) holds NaN or infinity."""
    if values.is_floating_point() and values.numel() and not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name}: contains NaN or infinite values")


def box_area(boxes: Tensor) -> Tensor:
    """Area of ``boxes: [..., N, 4]`` -> ``[..., N]``; inverted boxes count as zero area."""
    wh = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def _intersection(a: Tensor, b: Tensor) -> Tensor:
    """Intersection areas of ``a: [..., G, 4]`` and ``b: [..., N, 4]`` -> ``[..., G, N]``.

    Computed one coordinate at a time on contiguous ``[..., G, N]`` planes, in place where the
    operands are temporaries: broadcasting ``[..., G, N, 2]`` intermediates (inner dimension 2)
    and allocating a fresh matrix per step cost the CPU many times the arithmetic.
    """
    bt = b.transpose(-1, -2).contiguous()  # [..., 4, N]
    x1, y1, x2, y2 = (a[..., :, i, None] for i in range(4))  # [..., G, 1]
    u1, v1, u2, v2 = (bt[..., None, i, :] for i in range(4))  # [..., 1, N]
    w = torch.minimum(x2, u2)
    w -= torch.maximum(x1, u1)
    h = torch.minimum(y2, v2)
    h -= torch.maximum(y1, v1)
    return w.clamp_(min=0).mul_(h.clamp_(min=0))


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Intersection over union of ``a: [..., G, 4]`` and ``b: [..., N, 4]`` -> ``[..., G, N]``.

    Leading dimensions (a batch of images) broadcast. Unlike ``torchvision.ops.box_iou`` this
    never divides by zero: two zero-area boxes have IoU 0, not NaN, so degenerate input (and
    zero-area padding) cannot poison a ``max``.
    """
    inter = _intersection(a, b)
    union = box_area(a)[..., :, None] + box_area(b)[..., None, :]
    union -= inter
    return inter.div_(union.clamp_(min=_EPS))


def box_iof(a: Tensor, b: Tensor) -> Tensor:
    """Intersection over the area of the *first* boxes: ``a: [..., G, 4]``, ``b: [..., N, 4]``.

    Returns ``[..., G, N]``. Used for ignore regions: ``box_iof(candidates, ignore)[i, j]`` is the
    fraction of candidate ``i`` covered by ignore box ``j``.
    """
    return _intersection(a, b).div_(box_area(a)[..., :, None].clamp(min=_EPS))


def box_centers(boxes: Tensor) -> Tensor:
    """Centres of ``boxes: [..., N, 4]`` -> ``[..., N, 2]`` as ``(x, y)``."""
    return (boxes[..., :2] + boxes[..., 2:]) / 2
