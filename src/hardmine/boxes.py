"""Box geometry: IoU, IoF, areas, centres, greedy NMS and input validation.

Boxes are ``xyxy`` in absolute pixels, floating point. Quality matrices are ``[G, N]``:
the first argument's boxes by the second's. Half-precision boxes (``float16`` / ``bfloat16``, as
autocast hands them over) are computed in ``float32``, as ``torchvision.ops.box_iou`` does: in
``float16`` the area of a 400 px box overflows to ``inf`` and its IoU with itself is NaN.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from hardmine._segments import segment_rank
from hardmine.errors import NonFiniteError

_EPS = 1e-6
# nms_first works on [S, M, M] tables; above this many cells it hands over to torchvision's NMS.
NMS_TABLE_CELLS = 2**24


def coordinate_limit(dtype: torch.dtype) -> float:
    """The largest box coordinate (in absolute value) whose geometry stays finite in ``dtype``.

    Widths, areas, unions and squared centre distances of boxes within ``±L`` are at most
    ``8 L²``, so ``L`` is the power of two with ``8 L² <= finfo.max`` of the type the geometry is
    computed in (``upcast``: float32 for the half types): ``2**62`` (4.6e18) in float32,
    ``2**510`` in float64. A box beyond it is finite but its area is not, and every IoU with it
    would be 0 or NaN: a silent wrong answer.
    """
    return 2.0 ** ((math.frexp(torch.finfo(_geometry_dtype(dtype)).max)[1] - 4) // 2)


def _geometry_dtype(dtype: torch.dtype) -> torch.dtype:
    """The type box geometry is computed in for boxes in ``dtype`` (``upcast``)."""
    return torch.float32 if torch.finfo(dtype).bits < 32 else dtype


def check_boxes(boxes: Tensor, name: str) -> None:
    """Raise ``ValueError`` unless ``boxes`` is a finite floating ``[N, 4]`` tensor.

    Zero-area and out-of-image boxes are valid input (they match nothing). Errors: wrong shapes
    and integer dtypes; non-finite values, and coordinates beyond ``±coordinate_limit(dtype)``,
    whose areas would overflow (both ``NonFiniteError``, a ``ValueError``).
    """
    if not isinstance(boxes, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(boxes).__name__}")
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name}: expected shape [N, 4], got {list(boxes.shape)}")
    if not boxes.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {boxes.dtype}")
    if boxes.numel():
        # One reduction and one sync for both checks: amax propagates NaN.
        check_magnitude(float(boxes.detach().abs().amax()), boxes.dtype, name)


def check_magnitude(
    largest: float, dtype: torch.dtype, name: str, *, error: type[ValueError] = NonFiniteError
) -> None:
    """Raise ``error`` if ``largest``, the largest absolute coordinate of boxes in ``dtype``, is
    NaN, infinite or beyond ``coordinate_limit(dtype)``, naming ``name``."""
    if not math.isfinite(largest):
        raise error(f"{name}: contains NaN or infinite coordinates")
    limit = coordinate_limit(dtype)
    if largest > limit:
        geometry = str(_geometry_dtype(dtype)).removeprefix("torch.")
        raise error(
            f"{name}: coordinates up to {largest:.6g}, beyond ±2**{math.log2(limit):.0f} "
            f"({limit:.3g}): the boxes' widths and areas would overflow {geometry}"
        )


def check_finite(values: Tensor, name: str) -> None:
    """Raise ``NonFiniteError`` (a ``ValueError``) if a floating tensor (losses, scores) holds NaN
    or infinity."""
    if values.is_floating_point() and values.numel() and not bool(torch.isfinite(values).all()):
        raise NonFiniteError(f"{name}: contains NaN or infinite values")


def upcast(boxes: Tensor) -> Tensor:
    """``boxes`` in ``float32`` when they are in a half-precision type, else unchanged.

    Areas of boxes a few hundred pixels wide overflow ``float16`` (max 65504) and lose whole
    pixels in ``bfloat16`` (8 bits of mantissa); geometry is computed in ``float32`` or the
    input's higher precision.
    """
    if boxes.is_floating_point() and torch.finfo(boxes.dtype).bits < 32:
        return boxes.float()
    return boxes


def box_area(boxes: Tensor) -> Tensor:
    """Area of ``boxes: [..., N, 4]`` -> ``[..., N]``; inverted boxes count as zero area.

    ``float32`` for half-precision input (see ``upcast``).
    """
    boxes = upcast(boxes)
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


def _common_type(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Both boxes in one floating type, at least ``float32``."""
    dtype = torch.promote_types(upcast(a).dtype, upcast(b).dtype)
    return a.to(dtype), b.to(dtype)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Intersection over union of ``a: [..., G, 4]`` and ``b: [..., N, 4]`` -> ``[..., G, N]``.

    Leading dimensions (a batch of images) broadcast. Unlike ``torchvision.ops.box_iou`` this
    never divides by zero: two zero-area boxes have IoU 0, not NaN, so degenerate input (and
    zero-area padding) cannot poison a ``max``. Half-precision input is computed and returned in
    ``float32``.

    Raises:
        NonFiniteError: (a ``ValueError``) ``a`` or ``b`` holds NaN or infinity, or coordinates
            beyond ``±coordinate_limit`` (areas overflow), whose IoU would be a silent NaN or 0.
        ValueError: a last dimension other than 4, or integer boxes.

    Example:
        >>> import torch
        >>> from hardmine.boxes import box_iou
        >>> a = torch.tensor([[100.0, 100.0, 500.0, 500.0]], dtype=torch.float16)
        >>> box_iou(a, torch.cat([a, a + 200]))
        tensor([[1.0000, 0.1429]])
    """
    _check_pair(a, b)
    return iou_matrix(a, b)


def box_iof(a: Tensor, b: Tensor) -> Tensor:
    """Intersection over the area of the *first* boxes: ``a: [..., G, 4]``, ``b: [..., N, 4]``.

    Returns ``[..., G, N]`` (``float32`` for half-precision input). Used for ignore regions:
    ``box_iof(candidates, ignore)[i, j]`` is the fraction of candidate ``i`` covered by ignore
    box ``j``.

    Raises:
        NonFiniteError: (a ``ValueError``) ``a`` or ``b`` holds NaN or infinity, or coordinates
            beyond ``±coordinate_limit``.
        ValueError: a last dimension other than 4, or integer boxes.
    """
    _check_pair(a, b)
    return iof_matrix(a, b)


def _check_pair(a: Tensor, b: Tensor) -> None:
    for name, boxes in (("a", a), ("b", b)):
        if boxes.shape[-1:] != (4,):
            raise ValueError(f"{name}: expected boxes of shape [..., 4], got {list(boxes.shape)}")
        if not boxes.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got {boxes.dtype}")
        if boxes.numel():
            check_magnitude(float(boxes.detach().abs().amax()), boxes.dtype, name)


def iou_matrix(a: Tensor, b: Tensor) -> Tensor:
    """``box_iou`` without the input check, for callers that checked their boxes once already
    (the assigners and samplers, per batch): the check reads the device, a host synchronisation
    per call."""
    a, b = _common_type(a, b)
    inter = _intersection(a, b)
    union = box_area(a)[..., :, None] + box_area(b)[..., None, :]
    union -= inter
    return inter.div_(union.clamp_(min=_EPS))


def iof_matrix(a: Tensor, b: Tensor) -> Tensor:
    """``box_iof`` without the input check (see ``iou_matrix``)."""
    a, b = _common_type(a, b)
    return _intersection(a, b).div_(box_area(a)[..., :, None].clamp(min=_EPS))


def box_centers(boxes: Tensor) -> Tensor:
    """Centres of ``boxes: [..., N, 4]`` -> ``[..., N, 2]`` as ``(x, y)`` (``float32`` for half)."""
    boxes = upcast(boxes)
    return (boxes[..., :2] + boxes[..., 2:]) / 2


def nms_first(
    boxes: Tensor,
    scores: Tensor,
    segment: Tensor,
    num_segments: int,
    iou: float,
    k: int,
    *,
    max_cells: int | None = None,
) -> Tensor:
    """The first ``k`` survivors of greedy NMS in every segment, all segments at once.

    Greedy NMS visits the candidates by decreasing score (equal scores: lower index first) and
    keeps each one that no kept candidate overlaps by IoU > ``iou``. Its first ``k`` survivors
    depend only on the candidates up to the ``k``-th survivor, so this looks at a prefix of each
    segment's order, ``M`` long, grown fourfold until it holds ``k`` survivors (or the segment).
    In the prefix, from the pairwise IoUs ``[S, M, M]``, a candidate is settled as kept once every
    earlier candidate overlapping it is settled as suppressed, and as suppressed once one of them
    is kept. Each round settles at least the first unsettled candidate of every segment, so it
    ends; the number of rounds is the longest chain of overlaps, usually a handful. Beyond
    ``max_cells`` (default ``NMS_TABLE_CELLS``) table cells it runs torchvision's ``batched_nms``
    instead, which visits every candidate (same result, up to ties in score).

    Args:
        boxes: ``float [N, 4]``.
        scores: ``float [N]``, finite.
        segment: ``int64 [N]`` in ``[0, S)``; negative for candidates that take no part.
        num_segments: ``S``.
        iou: the suppression threshold.
        k: survivors wanted per segment.
        max_cells: see above.

    Returns:
        ``bool [N]``: each segment's first ``min(k, survivors)`` survivors.
    """
    n = scores.numel()
    out = torch.zeros(n, dtype=torch.bool, device=scores.device)
    usable = torch.nonzero(segment >= 0).flatten()
    if usable.numel() == 0 or k <= 0:
        return out
    seg = segment[usable]
    # By segment, then by score, descending, lower index first.
    order, rank, counts = segment_rank(seg, num_segments, scores[usable])
    sorted_seg = seg[order]
    longest = int(counts.max())
    length = min(longest, max(2 * k, 32))
    while True:
        if num_segments * length * length > (max_cells or NMS_TABLE_CELLS):
            return _nms_torchvision(boxes, scores, segment, iou, k, usable, out)
        kept, table = _nms_prefix(boxes[usable], order, sorted_seg, rank, num_segments, length, iou)
        found = kept.sum(1)  # [S]
        if length == longest or not bool(((found < k) & (counts > length)).any()):
            break
        length = min(longest, 4 * length)
    first = kept & (kept.cumsum(1) <= k)
    return out.index_fill_(0, usable[table[first]], True)


def _nms_prefix(
    boxes: Tensor,
    order: Tensor,
    sorted_seg: Tensor,
    rank: Tensor,
    num_segments: int,
    length: int,
    iou: float,
) -> tuple[Tensor, Tensor]:
    """Greedy NMS on the first ``length`` candidates of each segment (see ``nms_first``).

    Returns:
        ``(kept bool [S, M], table int64 [S, M])``: the survivors, and which candidate (an index
        into ``boxes``) each cell holds; empty cells hold 0 and are never kept.
    """
    inside = rank < length
    table = torch.full((num_segments, length), -1, dtype=torch.int64, device=boxes.device)
    table[sorted_seg[inside], rank[inside]] = order[inside]
    valid = table >= 0
    table.clamp_(min=0)
    cand = boxes[table]  # [S, M, 4]
    earlier = torch.ones(length, length, dtype=torch.bool, device=boxes.device).tril_(-1)
    # overlaps[s, i, j]: earlier candidate j would suppress i if kept.
    overlaps = (iou_matrix(cand, cand) > iou) & earlier & valid[:, None, :]
    return greedy_survivors(overlaps, valid), table


def greedy_survivors(overlaps: Tensor, valid: Tensor) -> Tensor:
    """Greedy NMS's survivors in tables of candidates sorted by score, all tables at once.

    A candidate survives when no earlier survivor suppresses it. Rather than visit the
    candidates one by one, each round settles every candidate whose earlier suppressors are all
    settled: kept when none of them was kept, suppressed as soon as one was. The first unsettled
    candidate of every table is settled in each round, so it ends; the number of rounds is the
    longest chain of overlaps, usually a handful.

    Args:
        overlaps: ``bool [S, M, M]``: ``overlaps[s, i, j]`` when candidate ``j`` comes before
            ``i`` in table ``s`` and would suppress it if kept (``j < i`` only).
        valid: ``bool [S, M]``: the cells that hold a candidate.

    Returns:
        ``bool [S, M]``: the survivors.
    """
    overlaps = overlaps & valid[:, None, :]
    kept = torch.zeros_like(valid)
    settled = ~valid
    while not bool(settled.all()):
        suppressed = (overlaps & kept[:, None, :]).any(2)
        open_blocker = (overlaps & ~settled[:, None, :]).any(2)
        kept = valid & ~suppressed & ~open_blocker
        settled = ~valid | kept | suppressed
    return kept


def _nms_torchvision(
    boxes: Tensor,
    scores: Tensor,
    segment: Tensor,
    iou: float,
    k: int,
    usable: Tensor,
    out: Tensor,
) -> Tensor:
    """``nms_first`` by torchvision's ``batched_nms`` over all usable candidates."""
    # Shift to non-negative coordinates: batched_nms separates classes by offsetting boxes by
    # class * (max coordinate + 1), which lets classes overlap when boxes leave the image.
    b = upcast(boxes[usable])
    keep = usable[batched_nms(b - b.min(), upcast(scores[usable]), segment[usable], iou)]
    # keep is by decreasing score; the first k of each segment.
    seg = segment[keep]
    num_segments = int(seg.max()) + 1 if seg.numel() else 0
    order, sorted_rank, _ = segment_rank(seg, num_segments)
    rank = torch.empty_like(order).index_copy_(0, order, sorted_rank)
    return out.index_fill_(0, keep[rank < k], True)
