"""Adaptive Training Sample Selection (Zhang et al., "Bridging the Gap Between Anchor-based and
Anchor-free Detection via Adaptive Training Sample Selection", CVPR 2020).

Per ground truth, the ``topk`` anchors nearest its centre on every pyramid level are candidates;
the IoU threshold is the candidates' IoU mean plus standard deviation, so it adapts to each
object's scale and shape instead of being one fixed number. Picks equal MMDetection's
``ATSSAssigner`` (itself a transcription of the authors' code); where they differ, the docstring
of ``assign_atss`` says so.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from typing import ClassVar, Literal, get_args

import numpy as np
import torch
from torch import Tensor

from hardmine.assign import _batch
from hardmine.assign._batch import DEFAULT_CHUNK_SIZE, Batch, best_of_chunk, prepare_batch
from hardmine.boxes import _EPS, box_area, box_centers
from hardmine.structures import IGNORE, POSITIVE, Assignment, check_fields, settings

TopkPer = Literal["anchor", "location"]

_INF = float("inf")
_INT_OF_SIZE = {2: torch.int16, 4: torch.int32}
#: Which 32-bit half of an ``int64`` holds its high bits, in memory.
_HIGH = 1 if sys.byteorder == "little" else 0


def _nearest(
    distance: Tensor,
    num_per_level: Sequence[int],
    level_k: Sequence[int],
    found: dict[int, Tensor] | None = None,
) -> Tensor:
    """Per level, the anchors of the ``k`` smallest distances of each row, ties to the lower index.

    ``distance: [B, G, N]`` (non-negative, no ``-0.0``) -> ``int64 [B, G, sum(level_k)]`` anchor
    indices, level by level, in no particular order within a level.

    ``topk`` leaves the order of ties unspecified (and anchors sharing a location always tie), so
    it runs on ``int64`` keys that are unique and order as ``(distance, index)`` does. For floats of
    up to 32 bits the key is the distance's bit pattern (which orders non-negative floats as their
    values) above the index: a few cheap passes, where ranking ties after a ``kthvalue`` costs
    several times more. Wider floats leave no room for the index; their key is the index plus
    ``n`` times a class (0 below the ``k``-th smallest distance, 1 equal to it, 2 above).

    On the CPU, levels of at least ``256 * k`` anchors first narrow the search (see
    ``_nearest_blocked``): there ``topk`` copies every element of its rows and costs several times
    the distances themselves (below, the narrowing's fixed costs outweigh what it saves).
    ``found`` maps the first anchor of a level to its answer, found on its grid (see
    ``_nearest_on_grid``; the level's distances are then not read).
    """
    parts, start = [], 0
    for n, k in zip(num_per_level, level_k, strict=True):
        if found is not None and start in found:
            parts.append(found[start])
            start += n
            continue
        d = distance[..., start : start + n]  # [B, G, n]
        if _blocked(d, n, k):
            parts.append(_nearest_blocked(d, k) + start)
            start += n
            continue
        index = torch.arange(n, device=d.device)
        if d.element_size() <= 4:
            key = d.view(_INT_OF_SIZE[d.element_size()]).to(torch.int64)
            key.bitwise_left_shift_(32).bitwise_or_(index)
        else:
            kth = d.topk(k, dim=-1, largest=False).values.amax(dim=-1, keepdim=True)  # [B, G, 1]
            key = torch.add(index, (d >= kth).to(torch.int64).add_(d > kth), alpha=n)
        parts.append(key.topk(k, dim=-1, largest=False, sorted=False).indices + start)
        start += n
    return torch.cat(parts, dim=-1)


def _blocked(distance: Tensor, n: int, k: int) -> bool:
    """Whether ``_nearest`` narrows its search on a level of ``n`` anchors by blocks."""
    return distance.device.type == "cpu" and distance.element_size() == 4 and n >= 256 * k


def _nearest_on_grid(dx: Tensor, dy: Tensor, grid: _Grid, k: int) -> Tensor:
    """``_nearest_blocked`` on a grid level (see ``_Grid``) whose squared distances are
    ``dx + dy``, without them: ``dx: [b, C, W, A]``, ``dy: [b, C, H, A]`` (``float32``) ->
    ``int64 [b, C, k]`` anchor indices, sorted by ``(distance, index)``.

    The blocks are ``m`` consecutive locations of a row (fewer at its end): consecutive anchor
    indices, as ``_nearest_blocked`` needs. As rounding is monotonic, a block's smallest distance
    is ``min over a of (dy[h, a] + min over its w of dx[w, a])``, to the bit: about ``H * W / m``
    operations per ground truth where the blocks' minimum reads every distance. Only the ``k``
    blocks of smallest ``(minimum, block)`` can hold the ``k`` nearest (the argument there), and
    only their distances are formed. ``m`` balances the blocks' count against their anchors.
    """
    num_images, num_gts, width, per_location = *dx.shape[:3], grid.per_location
    m = max(1, min(width, round(math.sqrt(grid.height * width / k / per_location))))
    num_blocks = -(-width // m)
    short = num_blocks * m - width  # past the row's end in its last block
    if short:  # +inf there: never a block's minimum
        pad = dx.new_full((num_images, num_gts, short, per_location), _INF)
        dx = torch.cat([dx, pad], dim=2)  # [b, C, nb * m, A]
    dx = dx.unflatten(2, (num_blocks, m))  # [b, C, nb, m, A]
    low = torch.add(dy[:, :, :, None], dx.amin(dim=3)[:, :, None]).amin(dim=-1)  # [b, C, H, nb]
    block_key = low.flatten(2).view(torch.int32).to(torch.int64).bitwise_left_shift_(32)
    block_key.bitwise_or_(torch.arange(block_key.shape[-1]))
    r = min(k, block_key.shape[-1])
    # In increasing order, so that a candidate's place among the blocks' anchors orders them as
    # their indices do: the key needs no index computed per anchor.
    block = block_key.topk(r, dim=-1, largest=False, sorted=False).indices.sort(dim=-1).values
    row, col_block = block // num_blocks, block % num_blocks  # [b, C, r]
    dy_row = dy.gather(2, row[..., None].expand(-1, -1, -1, per_location))  # [b, C, r, A]
    dx_block = dx.flatten(3).gather(2, col_block[..., None].expand(-1, -1, -1, m * per_location))
    dist = torch.add(dx_block.unflatten(3, (m, per_location)), dy_row[:, :, :, None])
    key = dist.flatten(2).view(torch.int32).to(torch.int64).bitwise_left_shift_(32)  # [b, C, r*m*A]
    key.bitwise_or_(torch.arange(key.shape[-1]))
    if short:  # past the row's end: after every anchor (infinite distances included)
        past = torch.arange(m) >= m - short  # [m]
        last = (col_block == num_blocks - 1)[..., None] & past  # [b, C, r, m]
        key.view(num_images, num_gts, r, m, per_location).masked_fill_(last[..., None], 2**63 - 1)
    place = key.topk(k, dim=-1, largest=False, sorted=True).indices  # [b, C, k]
    which, within = place // (m * per_location), place % (m * per_location)
    first = (row * width + col_block * m) * per_location  # [b, C, r]: the blocks' first anchors
    return first.gather(2, which).add_(within).add_(grid.start)


def _nearest_blocked(d: Tensor, k: int) -> Tensor:
    """``_nearest`` on one level of ``float32`` distances ``d: [B, G, n]``, ``n >= 64 * k``: the
    same anchors, sorted by ``(distance, index)`` (the order ``topk`` gives such rows on the CPU,
    which the threshold's sums keep to the last bit) -> ``int64 [B, G, k]``.

    The row is cut into blocks of ``m = 64`` consecutive anchors (``amin`` over fewer contiguous
    elements runs several times slower per element on the CPU) and the last ``n % m`` anchors. A
    block's key is its smallest ``(distance, index)``; as blocks hold consecutive indices, that
    orders as ``(smallest distance, block number)``. The ``k`` nearest anchors lie in the ``k``
    blocks of smallest keys and the remainder: an anchor in another block is preceded (in key
    order) by the smallest anchor of each of those ``k`` blocks. So one ``amin`` pass over the
    row, then ``topk`` over ``n / m`` block keys and ``k * m + n % m`` anchors, where ``topk`` over
    the whole row would copy every element of it.
    """
    n = d.shape[-1]
    m = 64
    full = n // m * m
    low = d[..., :full].unflatten(-1, (-1, m)).amin(dim=-1)  # [B, G, n // m]
    block_key = low.view(torch.int32).to(torch.int64).bitwise_left_shift_(32)
    block_key.bitwise_or_(torch.arange(low.shape[-1], device=d.device))
    block = block_key.topk(k, dim=-1, largest=False, sorted=False).indices  # [B, G, k]
    index = (block[..., None] * m + torch.arange(m, device=d.device)).flatten(-2)  # [B, G, k * m]
    if full < n:
        rest = torch.arange(full, n, device=d.device).expand(*index.shape[:-1], n - full)
        index = torch.cat([index, rest], dim=-1)
    key = d.gather(-1, index).view(torch.int32).to(torch.int64).bitwise_left_shift_(32)
    order = key.bitwise_or_(index).topk(k, dim=-1, largest=False, sorted=True).indices
    return index.gather(-1, order)


def _adaptive_threshold(iou: Tensor) -> Tensor:
    """Mean plus standard deviation (Bessel-corrected, as ``torch.std``) of each row's IoUs.

    ``iou: [B, G, K]`` (the candidates') -> ``[B, G, 1]``. The statistics are taken about the
    best IoU: equal IoUs then give exactly that IoU as threshold (a plain mean may round above it
    and reject them all), and the sums lose less precision. A single candidate has standard
    deviation 0.
    """
    num = iou.shape[-1]
    ref = iou.amax(dim=-1, keepdim=True)  # [B, G, 1]
    dev = iou - ref
    mean = dev.sum(dim=-1, keepdim=True) / num
    var = (dev - mean).square_().sum(dim=-1, keepdim=True) / max(num - 1, 1)
    return ref + mean + var.sqrt_()


def _center_inside(cx: Tensor, cy: Tensor, gt_boxes: Tensor, margin: float) -> Tensor:
    """Whether anchor centres lie inside ground truths by more than ``margin`` on every side.

    ``cx, cy: [B, G, K]`` (each ground truth's candidates), ``gt_boxes: [B, G, 4]`` ->
    ``bool [B, G, K]``.
    """
    x1, y1, x2, y2 = (gt_boxes[..., i, None] for i in range(4))  # [B, G, 1]
    nearest_side = torch.minimum(torch.minimum(cx - x1, cy - y1), torch.minimum(x2 - cx, y2 - cy))
    return nearest_side > margin


@dataclass(frozen=True)
class ATSSAssigner:
    """``assign_atss`` as an ``Assigner``; its fields are the settings (see there).

    Needs ``num_per_level``: it labels anchors on a feature pyramid (RetinaNet, FCOS, ATSS), not an
    R-CNN's proposals, which have no levels (``needs_levels``).
    """

    topk: int = 9
    anchors_per_location: int = 1
    topk_per: TopkPer = "anchor"
    ignore_iof_thr: float = 0.5
    center_margin: float = 0.01
    chunk_size: int = DEFAULT_CHUNK_SIZE
    needs_levels: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_fields(self)
        check_atss_settings(**settings(self))

    def __call__(
        self,
        candidates: Sequence[Tensor],
        gt_boxes: Sequence[Tensor],
        gt_labels: Sequence[Tensor],
        *,
        ignore_boxes: Sequence[Tensor] | None = None,
        num_per_level: Sequence[int] | None = None,
    ) -> list[Assignment]:
        """Assign a batch of anchors.

        Raises:
            ValueError: without ``num_per_level``.
        """
        if num_per_level is None:
            raise ValueError("ATSSAssigner needs num_per_level, the anchors per pyramid level")
        return assign_atss(
            candidates,
            gt_boxes,
            gt_labels,
            num_per_level=num_per_level,
            ignore_boxes=ignore_boxes,
            **settings(self),
        )


def check_atss_settings(
    *,
    topk: int,
    anchors_per_location: int,
    topk_per: str,
    ignore_iof_thr: float,
    center_margin: float,
    chunk_size: int,
) -> None:
    """Raise ``ValueError`` naming the first setting of ``assign_atss`` out of its range."""
    for name, value in (
        ("topk", topk),
        ("anchors_per_location", anchors_per_location),
        ("chunk_size", chunk_size),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if topk_per not in get_args(TopkPer):
        raise ValueError(f"topk_per must be one of {get_args(TopkPer)}, got {topk_per!r}")
    if not 0.0 <= ignore_iof_thr <= 1.0:
        raise ValueError(f"ignore_iof_thr must be in [0, 1], got {ignore_iof_thr}")
    if not 0.0 <= center_margin < float("inf"):
        raise ValueError(f"center_margin must be finite and >= 0, got {center_margin}")


def assign_atss(
    anchors: Sequence[Tensor],
    gt_boxes: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    *,
    num_per_level: Sequence[int],
    topk: int = ATSSAssigner.topk,
    anchors_per_location: int = ATSSAssigner.anchors_per_location,
    topk_per: TopkPer = ATSSAssigner.topk_per,
    ignore_boxes: Sequence[Tensor] | None = None,
    ignore_iof_thr: float = ATSSAssigner.ignore_iof_thr,
    center_margin: float = ATSSAssigner.center_margin,
    chunk_size: int = ATSSAssigner.chunk_size,
) -> list[Assignment]:
    """Assign anchors by ATSS.

    For every ground truth: on each pyramid level, the ``topk`` anchors (fewer if the level has
    fewer) whose centres are nearest the ground truth's centre (L2) are candidates; the threshold
    is the mean plus the standard deviation of the candidates' IoUs; a candidate is positive where
    its IoU reaches the threshold and its centre lies inside the ground truth by more than
    ``center_margin`` on every side. An anchor positive for several ground truths takes the one
    with the highest IoU (the first on ties). Every other anchor is negative.

    **k counts anchors** (``topk_per="anchor"``, the default). The paper (Sec. 3.1; only the
    Papers with Code summary of it is in ``papers/summaries_ohem_atss_iou_balanced.txt``, which
    quotes it): "on each pyramid level, we select k anchor boxes whose center are closest to the
    center of g based on L2 distance. Supposing there are L feature pyramid levels, the
    ground-truth box g will have k x L candidate positive samples". ATSS itself tiles one anchor
    per location, where anchors and locations are the same count. With A anchors per location
    (torchvision's RetinaNet: A = 9) the A anchors of a location share its centre and tie in
    distance, so k anchor boxes are the nearest ceil(k / A) locations' anchors (ties to the lower
    index): with k = A = 9, exactly one location's 9 anchors per level. MMDetection's
    ``ATSSAssigner`` reads it so too (``selectable_k = min(self.topk, bboxes_per_level)``).
    ``topk_per="location"`` is the authors' code (sfzhang15/ATSS, ``topk =
    min(self.cfg.MODEL.ATSS.TOPK * num_anchors_per_loc, num_anchors_per_level[level])``): k
    *locations*, ``topk * anchors_per_location`` anchors per level, so that k keeps its spatial
    meaning on a many-anchor model. ``anchors_per_location`` matters only there; the RetinaNet
    wrapper (``hardmine.models.with_assigner``) sets it to the model's count.

    Ignore regions follow MMDetection: anchors whose IoF with an ignore box (the fraction of the
    anchor covered) exceeds ``ignore_iof_thr`` are ignored, and are the last to be chosen as
    candidates (only when a level has too few others). One still chosen that passes the test
    stays positive, as in MMDetection.

    Differences from MMDetection, all in degenerate cases: ties in distance go to the lower anchor
    index (MMDetection's ``topk`` leaves them unspecified); equal candidate IoUs give exactly that
    IoU as threshold (MMDetection's float mean may round above it); a single candidate in all has
    standard deviation 0 (``torch.std`` gives NaN, hence no positive); ignore regions also apply
    in images without ground truth.

    Args:
        anchors: per image ``float [N, 4]``, levels concatenated in order; every image has the same
            ``N = sum(num_per_level)`` (the anchors themselves may differ).
        gt_boxes: per image ``float [G_i, 4]``.
        gt_labels: per image ``int [G_i]`` classes (1-based; 0 is background).
        num_per_level: anchors per pyramid level.
        topk: candidates per level and ground truth (the paper: 9, robust over 7-17).
        anchors_per_location: anchors sharing a location (scales times aspect ratios); used by
            ``topk_per="location"`` only.
        topk_per: ``"anchor"`` (the paper's text, MMDetection): ``topk`` anchors per level;
            ``"location"`` (the authors' code): ``topk * anchors_per_location`` anchors per level.
        ignore_boxes: per image ``float [K_i, 4]`` regions (e.g. COCO crowd boxes), or ``None``.
        ignore_iof_thr: IoF above which an anchor is ignored.
        center_margin: how far inside the ground truth a positive's centre must lie (MMDetection:
            0.01 pixels).
        chunk_size: ground truths per chunk of the ``[B, G, N]`` computation; smaller bounds memory
            with many ground truths, the result is the same.

    Returns:
        One ``Assignment`` per image (``hardmine.structures.Assignment``). ``gt_index`` and
        ``max_iou`` give the matched ground truth for positives and the best-overlapping one
        elsewhere.

    Raises:
        ValueError: on non-finite boxes or coordinates beyond ``hardmine.boxes.coordinate_limit``
            (±4.6e18 in float32: their areas would overflow), anchor counts that differ from
            ``sum(num_per_level)`` or invalid settings.

    Example:
        Four 10-px anchors on one level; the three nearest the ground truth's centre are
        candidates (IoUs 0.69, 0.09, 0.09), the threshold is their mean plus standard deviation
        (0.29 + 0.35), and only the first anchor reaches it.

        >>> import torch
        >>> from hardmine.assign.atss import assign_atss
        >>> anchors = [[0, 0, 10, 10], [10, 0, 20, 10], [0, 10, 10, 20], [10, 10, 20, 20]]
        >>> anchors = torch.tensor(anchors, dtype=torch.float32)
        >>> gt = torch.tensor([[0.0, 0.0, 12.0, 12.0]])
        >>> labels = [torch.tensor([1])]
        >>> (a,) = assign_atss([anchors], [gt], labels, num_per_level=[4], topk=3)
        >>> a.label.tolist()
        [1, 0, 0, 0]
    """
    check_atss_settings(
        topk=topk,
        anchors_per_location=anchors_per_location,
        topk_per=topk_per,
        ignore_iof_thr=ignore_iof_thr,
        center_margin=center_margin,
        chunk_size=chunk_size,
    )
    if any(n < 0 for n in num_per_level):
        raise ValueError(f"num_per_level must be non-negative, got {list(num_per_level)}")
    if len(anchors) == 0:
        return []
    batch = prepare_batch(anchors, gt_boxes, gt_labels, ignore_boxes, ignore_iof_thr)
    total = sum(num_per_level)
    if any(n != total for n in batch.num_candidates):
        raise ValueError(
            f"anchors: expected sum(num_per_level) = {total} per image, got {batch.num_candidates}"
        )
    k = topk * anchors_per_location if topk_per == "location" else topk
    level_k = [min(k, n) for n in num_per_level]
    grids = _find_grids(batch.candidates, num_per_level)
    # Grid levels whose nearest anchors need no distance matrix: where ``_nearest`` would narrow
    # its search by blocks, they are found on the grid instead (``_nearest_on_grid``; ignored
    # anchors break the grid's separable distances: not there).
    search = {
        g.start: k
        for g, n, k in zip(grids, num_per_level, level_k, strict=True)
        if g is not None and batch.ignored is None and _blocked(batch.candidates, n, k)
    }
    # Large grid levels take windows (``_Grid.sparse``) where their matrix in a chunk can be
    # large enough, in blocks of eight times the default where a level searched on its grid
    # takes them: most of the [b, C, N] matrices' columns are then never formed (neither
    # distances nor IoUs), so larger blocks fit the caches alike and fewer of them cost fewer
    # small operations. Measured on 16 images of 22k anchors (benchmarks/samplers.py): 1.9 ->
    # 1.4 ms per image (the matrices' untouched pages stay unmapped).
    # Otherwise twice the default block: the [b, C, N] matrices live in one reused workspace
    # (below), whose pages stay mapped; halving the blocks' count halves their fixed costs. Four
    # times where the large levels are searched on their grid: then a block makes fewer passes
    # over its matrices, and its fixed costs (hundreds of small operations) weigh more. Measured
    # as above: 2.4 -> 1.8 ms per image; without the grid search four times is slower (2.4 ->
    # 2.6). The workspace stays within its cap (21 MB there; 43 MB with windows).
    blocks = batch.blocks(chunk_size, 8 * _batch.CPU_BLOCK_ELEMENTS)
    per_anchor = max(blk.gt_boxes.shape[0] * min(c, blk.gt_boxes.shape[1]) for blk, c in blocks)
    grids = [_sparse(batch.candidates, g, per_anchor) for g in grids]
    if not any(g is not None and g.sparse and g.start in search for g in grids):
        blocks = batch.blocks(chunk_size, (4 if search else 2) * _batch.CPU_BLOCK_ELEMENTS)
    size = max(
        blk.candidates.shape[0] * min(chunk, blk.gt_boxes.shape[1]) * blk.candidates.shape[1]
        for blk, chunk in blocks
    )
    work = _workspace(batch.candidates, size)
    return [
        a
        for block, chunk in blocks
        for a in _assign_block(
            block, num_per_level, level_k, center_margin, chunk, work, grids, search
        )
    ]


_scratch = threading.local()


def _workspace(like: Tensor, size: int) -> Tensor:
    """``[3, size]`` scratch in ``like``'s dtype and device for the ``[b, C, N]`` matrices.

    On the CPU memory not freshly touched is speed: a matrix allocated per step faults in fresh
    pages every time (glibc hands blocks this large back to the system when freed), which cost
    more than the arithmetic. So each thread keeps its scratch between calls, up to the size that
    ``Batch.blocks`` aims at (a few ``CPU_BLOCK_ELEMENTS``: up to 48 MB of ``float32``, mostly
    untouched where windows take the large levels); larger or other devices' is allocated per
    call (CUDA's caching allocator reuses it anyway).
    """
    if like.device.type != "cpu" or size > 8 * _batch.CPU_BLOCK_ELEMENTS:
        return like.new_empty(3, size)
    work = getattr(_scratch, "work", None)
    if work is None or work.dtype != like.dtype or work.numel() < 3 * size:
        work = like.new_empty(3 * size)
        _scratch.work = work
    return work[: 3 * size].view(3, size)  # contiguous: ``_scratch_views`` carves it


def _scratch_views(work: Tensor, specs: Sequence[tuple[torch.dtype, int]]) -> list[Tensor]:
    """One 1-D tensor per ``(dtype, numel)`` of ``specs``, side by side in the memory of ``work``
    (contiguous scratch from ``_workspace``, whose contents they overwrite) where they all fit,
    else fresh (see ``_workspace`` for why)."""
    raw = work.view(-1).view(torch.uint8)
    views, at = [], 0
    for dtype, numel in specs:
        at = -(-at // 8) * 8  # aligned for any dtype
        if at + numel * dtype.itemsize > raw.numel():
            return [torch.empty(n, dtype=d, device=work.device) for d, n in specs]
        views.append(raw[at : at + numel * dtype.itemsize].view(dtype))
        at += numel * dtype.itemsize
    return views


@dataclass(frozen=True)
class _Grid:
    """A pyramid level whose anchors lie on a grid, as anchor generators tile them (torchvision's
    ``AnchorGenerator``, MMDetection's): anchor ``(h * width + w) * per_location + a`` of the
    level, its x coordinates a function of ``(w, a)`` alone and its y coordinates of ``(h, a)``.

    Then a ``[C, H, W, A]`` matrix of distances or intersections is one broadcast of a ``[C, W, A]``
    and a ``[C, H, A]`` part: one pass over the level's elements instead of several.
    """

    start: int
    height: int
    width: int
    per_location: int
    #: Whether its IoUs may be computed only where ground truths meet anchors (``_windows``):
    #: at least ``_WINDOW_MIN_ANCHORS`` of one per location, in ``float32``, of positive width and
    #: height, x1 and x2 non-decreasing along a row and y1 and y2 down a column (so the anchors
    #: that a box meets form a rectangle of cells), and coordinates too small to overflow areas.
    sparse: bool = False

    @property
    def stop(self) -> int:
        return self.start + self.height * self.width * self.per_location

    def parts(self, plane: Tensor) -> tuple[Tensor, Tensor]:
        """``plane: [b, N]`` (one coordinate of every anchor) -> its values on this level as the
        ``[b, W, A]`` x part (the first row) and the ``[b, H, A]`` y part (the first column)."""
        level = plane[:, self.start : self.stop].unflatten(
            1, (self.height, self.width, self.per_location)
        )  # [b, H, W, A]
        return level[:, 0], level[:, :, 0]

    def view(self, matrix: Tensor) -> Tensor:
        """``matrix: [b, C, N]`` -> this level's ``[b, C, H, W, A]`` view of it."""
        return matrix[..., self.start : self.stop].unflatten(
            -1, (self.height, self.width, self.per_location)
        )


def _find_grids(anchors: Tensor, num_per_level: Sequence[int]) -> list[_Grid | None]:
    """Each level's grid (see ``_Grid``), ``None`` where its anchors do not lie on one.

    ``anchors: [B, N, 4]`` (a broadcast view where images share them). The grid's shape is guessed
    from the first image (a location's anchors share their centre; a row's share its y) and then
    verified bit for bit on every image's anchors, so hand-made, shuffled or per-image different
    anchors take the generic path. CPU only: the guess reads sizes on the host, a synchronisation
    that CUDA code must not add (there every level is ``None``).
    """
    if anchors.device.type != "cpu" or anchors.shape[1] == 0:
        return [None] * len(num_per_level)
    anc = anchors[:1] if anchors.stride(0) == 0 else anchors
    # On the host, as NumPy arrays: dozens of operations on a few thousand numbers each, where
    # torch's per-operation overhead would cost more than the work. The coordinates are compared
    # as integers (bit for bit: 0.0 and -0.0 differ), on planes: neighbours compared along a
    # contiguous axis run several times faster than broadcasts over the [N, 4] rows.
    first = anc[0].detach().numpy()  # [N, 4]
    bits = anc.detach().numpy().view(np.int32 if anc.element_size() == 4 else np.int64)
    planes = np.ascontiguousarray(bits.transpose(0, 2, 1))  # [b, 4, N]
    grids: list[_Grid | None] = []
    start = 0
    for n in num_per_level:
        grids.append(None)
        start += n
        if n == 0:
            continue
        level = first[start - n : start]  # [n, 4]
        # A location's anchors: those up to the first other centre (looked for in a short prefix
        # first, as locations hold a few anchors); a row's: up to the first other y1.
        per_location = _first_change(level[:64]) or _first_change(level) or n
        y1 = level[::per_location, 1]
        row = int((y1 != y1[0]).argmax()) * per_location or n
        if row % per_location or n % row:
            continue
        grid = _Grid(start - n, n // row, row // per_location, per_location)
        # x1 and x2 equal in every row (the row above's), y1 and y2 at every location of a row
        # (the previous location's).
        x, y = (planes[:, i::2, start - n : start].reshape(-1, 2, grid.height, row) for i in (0, 1))
        if (x[:, :, 1:] == x[:, :, :-1]).all() and (
            y[..., per_location:] == y[..., :-per_location]
        ).all():
            grids[-1] = grid
    return grids


#: Coordinates below which no width, area, sum of areas or intersection overflows ``float32``:
#: windows need finite IoUs in ``[0, 1]`` (a NaN would order differently in the two reductions).
_SPARSE_LIMIT = math.sqrt(np.finfo(np.float32).max) / 4


def _sparse(anchors: Tensor, grid: _Grid | None, per_anchor: int) -> _Grid | None:
    """``grid`` with ``sparse`` set where it holds (see ``_Grid.sparse``) and its windows may pay:
    its ``[b, C, n]`` matrix in a chunk (``per_anchor`` elements per anchor at most) holds at
    least ``_WINDOW_MIN_ELEMENTS``. ``anchors: [B, N, 4]`` as ``_find_grids`` takes them."""
    if (
        grid is None
        or grid.per_location > 1
        or anchors.dtype != torch.float32
        or grid.stop - grid.start < _WINDOW_MIN_ANCHORS
        or per_anchor * (grid.stop - grid.start) < _WINDOW_MIN_ELEMENTS
    ):
        return grid
    anc = anchors[:1] if anchors.stride(0) == 0 else anchors
    level = anc[:, grid.start : grid.stop].detach().numpy().reshape(-1, grid.height, grid.width, 4)
    # A location's anchors share their x (y) with the row's (column's): these are all of them.
    row, column = level[:, 0, :, 0::2], level[:, :, 0, 1::2]  # x1, x2; y1, y2
    sparse = (
        max(np.abs(row).max(), np.abs(column).max()) < _SPARSE_LIMIT
        and (row[..., 1] > row[..., 0]).all()
        and (column[..., 1] > column[..., 0]).all()
        and (np.diff(row, axis=1) >= 0).all()
        and (np.diff(column, axis=1) >= 0).all()
    )
    return replace(grid, sparse=bool(sparse))


def _first_change(boxes: np.ndarray) -> int:
    """The first of ``boxes: [n, 4]`` whose centre differs from the first's, or 0 if none."""
    twice_center = boxes[:, :2] + boxes[:, 2:]
    return int((twice_center != twice_center[0]).any(axis=1).argmax())


#: Anchors from which a grid level with one anchor per location takes the broadcast distances and
#: intersections (see ``_Grid``). On smaller levels the broadcasts' dozen more small operations
#: cost more than the passes they save; they join the generic run of their neighbours.
_GRID_MIN_ANCHORS = 4096


def _segments(
    num_anchors: int, grids: Sequence[_Grid | None], search: dict[int, int]
) -> list[_Grid | tuple[int, int]]:
    """The anchors ``[0, num_anchors)`` cut into the grid levels computed from their parts (those
    in ``search``, and those of one anchor per location and at least ``_GRID_MIN_ANCHORS``) and
    ``(start, stop)`` runs of the others (one run for all when there are none)."""
    out: list[_Grid | tuple[int, int]] = []
    start = 0
    for grid in grids:
        if grid is None:
            continue
        size = grid.stop - grid.start
        if grid.start not in search and (grid.per_location > 1 or size < _GRID_MIN_ANCHORS):
            continue
        if start < grid.start:
            out.append((start, grid.start))
        out.append(grid)
        start = grid.stop
    if start < num_anchors or not out:
        out.append((start, num_anchors))
    return out


def _distance_into(
    segments: Sequence[_Grid | tuple[int, int]],
    near: Tensor,
    centers: Tensor,
    ignored: Tensor | None,
    gt_centers: Tensor,
    out: Tensor,
    tmp: Tensor,
    search: dict[int, int],
) -> dict[int, Tensor]:
    """Squared distances between anchor and ground-truth centres, written into ``out``.

    ``near, centers: [b, 2, N]`` (anchor centres; ``near`` infinite at ignored anchors),
    ``ignored: bool [b, N]`` or ``None``, ``gt_centers: [b, C, 2]``, ``out, tmp: [b, C, N]``.
    Squared distances order anchors as the distances do, without a square root; every element
    is ``(x - gx)^2 + (y - gy)^2`` in that order (so any tie is the reference's), on a grid level
    from its two parts, elsewhere one plane per coordinate, in place (no ``[b, C, N, 2]``
    intermediates). An ignored anchor's distance is infinite either way.

    Grid levels in ``search`` (first anchor -> ``k``) are not written: their ``k`` nearest
    anchors are found from the parts (``_nearest_on_grid``) and returned, by first anchor.
    """
    found = {}
    gx, gy = gt_centers[..., 0, None], gt_centers[..., 1, None]  # [b, C, 1]
    for seg in segments:
        if isinstance(seg, _Grid) and (seg.start in search or seg.per_location == 1):
            (cx, _), (_, cy) = seg.parts(centers[:, 0]), seg.parts(centers[:, 1])
            dx = (cx[:, None] - gx[..., None]).square_()  # [b, C, W, A]
            dy = (cy[:, None] - gy[..., None]).square_()  # [b, C, H, A]
            if seg.start in search:
                found[seg.start] = _nearest_on_grid(dx, dy, seg, search[seg.start])
                continue
            level = torch.add(dx[:, :, None], dy[:, :, :, None], out=seg.view(out))
            if ignored is not None:
                level.masked_fill_(seg.view(ignored[:, None]), _INF)
        else:
            lo, hi = (seg.start, seg.stop) if isinstance(seg, _Grid) else seg
            d = torch.sub(near[:, None, 0, lo:hi], gx, out=out[..., lo:hi]).square_()
            d += torch.sub(near[:, None, 1, lo:hi], gy, out=tmp[..., lo:hi]).square_()
    return found


def _iou_into(
    segments: Sequence[_Grid | tuple[int, int]],
    gts: Tensor,
    corners: Tensor,
    area: Tensor,
    out: Tensor,
    tmp: tuple[Tensor, Tensor],
) -> Tensor:
    """``iou_matrix(gts, anchors)`` for the anchors of ``segments``, side by side in their order,
    written into ``out``, the two ``tmp`` as scratch (all ``[B, C, n]``, ``n`` the segments'
    anchors): the same operations in the same order, so the same bits. On a grid level
    (``segments``, see ``_distance_into``) the intersection is one broadcast product of its
    clamped width (``[B, C, W, A]``) and height (``[B, C, H, A]``).

    ``gts: [B, C, 4]``, ``corners: [B, 4, N]`` (the anchors, a plane per coordinate),
    ``area: [B, N]`` (``box_area`` of the anchors) -> ``out``.
    """
    x1, y1, x2, y2 = (gts[..., i, None] for i in range(4))  # [B, C, 1]
    spans, at = [], 0
    for seg in segments:
        lo, hi = (seg.start, seg.stop) if isinstance(seg, _Grid) else seg
        spans.append((lo, hi))
        cols, at = slice(at, at + hi - lo), at + hi - lo
        if isinstance(seg, _Grid) and seg.per_location == 1:
            (u1, _), (_, v1), (u2, _), (_, v2) = (seg.parts(corners[:, i]) for i in range(4))
            w = torch.minimum(x2[..., None], u2[:, None])  # [B, C, W, A]
            w -= torch.maximum(x1[..., None], u1[:, None])
            h = torch.minimum(y2[..., None], v2[:, None])  # [B, C, H, A]
            h -= torch.maximum(y1[..., None], v1[:, None])
            level = out[..., cols].unflatten(-1, (seg.height, seg.width, 1))  # [B, C, H, W, A]
            torch.mul(w.clamp_(min=0)[:, :, None], h.clamp_(min=0)[:, :, :, None], out=level)
            continue
        u1, v1, u2, v2 = (corners[:, None, i, lo:hi] for i in range(4))  # [B, 1, n]
        w = torch.minimum(x2, u2, out=out[..., cols])
        w -= torch.maximum(x1, u1, out=tmp[0][..., cols])
        h = torch.minimum(y2, v2, out=tmp[0][..., cols])
        h -= torch.maximum(y1, v1, out=tmp[1][..., cols])
        w.clamp_(min=0).mul_(h.clamp_(min=0))
    if all(a[1] == b[0] for a, b in pairwise(spans)):  # one run
        area = area[:, spans[0][0] : spans[-1][1]]
    else:
        area = torch.cat([area[:, lo:hi] for lo, hi in spans], dim=1)  # [B, n]
    union = torch.add(box_area(gts)[..., None], area[:, None], out=tmp[0])
    union -= out
    return out.div_(union.clamp_(min=_EPS))


def _candidate_iou(
    gts: Tensor, gt_area: Tensor, candidate: Tensor, corners: Tensor, area: Tensor
) -> Tensor:
    """``iou_matrix`` of each ground truth with its candidates only, with ``_iou_into``'s
    operations (the same bits): ``gts: [B, C, 4]``, ``gt_area: [B, C]`` (their ``box_area``),
    ``candidate: int64 [B, C, K]`` anchor indices, ``corners: [B, 4, N]``, ``area: [B, N]`` ->
    ``[B, C, K]``."""
    flat = candidate.flatten(1)  # [B, C * K]
    planes = corners.gather(2, flat[:, None].expand(-1, 4, -1)).view(-1, 4, *candidate.shape[1:])
    u1, v1, u2, v2 = planes.unbind(1)  # [B, C, K] each
    x1, y1, x2, y2 = (gts[..., i, None] for i in range(4))  # [B, C, 1]
    w = torch.minimum(x2, u2)
    w -= torch.maximum(x1, u1)
    h = torch.minimum(y2, v2)
    h -= torch.maximum(y1, v1)
    inter = w.clamp_(min=0).mul_(h.clamp_(min=0))
    union = gt_area[..., None] + area.gather(1, flat).view_as(candidate)
    union -= inter
    return inter.div_(union.clamp_(min=_EPS))


#: Sparse grid levels take their windows (``_windows``) where these hold at most this fraction
#: of the level's IoU matrix: each window cell costs several times a cell of the matrix (keys, a
#: scatter). On benchmarks/samplers.py's boxes the stride-8 level's windows hold about 7% of it,
#: the stride-16 level's about 11%.
_WINDOW_FRACTION = 1 / 6
#: Sparse grid levels of fewer anchors take the matrix: their windows (a box plus an anchor's
#: size, in cells) cover too much of them, and save less than the windows' host work costs.
#: Measured on benchmarks/samplers.py (16 images): windows on its 4200-anchor level too, 1.37 ->
#: 1.44 times the matrix's speed.
_WINDOW_MIN_ANCHORS = 4096
#: Nor do windows pay where the level's matrix in a chunk (images x ground truths x anchors) is
#: smaller: their fixed costs (host work, keys, the candidates' IoUs computed apart) then cancel
#: what they save. Measured on benchmarks/samplers.py's stride-8 level: 2 images of 20 ground
#: truths (668k elements) took as long with windows as without (1.34 and 1.30 ms per image).
_WINDOW_MIN_ELEMENTS = 2**20


@dataclass(frozen=True)
class _Windows:
    """Where ground truths meet a sparse grid level's anchors, row by row: for each row of cells
    that a ground truth meets, a window of ``cols`` cells there holding every anchor it meets
    (see ``_windows``), and the clamped widths and heights (``_iou_into``'s) of the
    intersections and anchors. ``R`` rows in all; ground truths numbered ``b * C + c``, anchors
    ``b * n + i`` (``i`` in the level of ``n``)."""

    pair: Tensor  # int64 [R]: each row's ground truth
    first: Tensor  # int32 (int64 past 2**31 anchors) [R]: each window's first anchor
    inter_w: Tensor  # [B * C, cols]: per ground truth, along its window
    anchor_w: Tensor  # [B * C, cols]
    inter_h: Tensor  # [R]
    anchor_h: Tensor  # [R]


def _windows(grid: _Grid, gts: Tensor, corners: Tensor) -> _Windows | None:
    """The windows of ``gts: [B, C, 4]`` on a sparse grid level (``_Grid.sparse``; ``corners:
    [B, 4, N]`` as ``_iou_into`` takes them), or ``None`` where they would hold more than
    ``_WINDOW_FRACTION`` of the level's IoU matrix (the matrix is cheaper there) or a ground
    truth's coordinates reach ``_SPARSE_LIMIT``.

    Only anchors that a ground truth meets with positive width and height (both clamped as in
    ``_iou_into``) have a non-zero IoU with it. On a sparse level those widths are positive on
    an interval of columns (an anchor's x1 below the box's x2: a prefix; its x2 above the box's
    x1: a suffix), the heights on an interval of rows: the anchors form a rectangle of cells.
    Each of its rows takes a window of the widest rectangle's width, moved back where it would
    pass the grid's edge (windows of one size, rows exactly: a third of the padding of whole
    rectangles' windows on benchmarks/samplers.py's boxes).

    On the host: a few dozen operations on some thousand numbers, where torch's per-operation
    overhead would cost more than the work (as in ``_find_grids``; CPU only). IEEE minimum,
    maximum and subtraction are exact: the same bits as torch's.
    """
    num_images, num_gts = gts.shape[:2]
    height, width = grid.height, grid.width
    planes = corners[:1] if corners.stride(0) == 0 else corners  # [b, 4, N]
    level = planes.detach().numpy()[:, :, grid.start : grid.stop].reshape(-1, 4, height, width)
    u1, u2, v1, v2 = level[:, 0, 0], level[:, 2, 0], level[:, 1, :, 0], level[:, 3, :, 0]
    boxes = gts.detach().numpy()  # [B, C, 4]
    if np.abs(boxes).max(initial=0) >= _SPARSE_LIMIT:  # a ground truth's area may be NaN
        return None
    x1, y1, x2, y2 = boxes.transpose(2, 0, 1)[..., None]  # [B, C, 1] each
    image = np.arange(num_images)[:, None, None] if len(level) > 1 else 0
    (first_col, cols), (first_row, rows) = (
        _span(u1, u2, x1, x2, image),
        _span(v1, v2, y1, y2, image),
    )
    meets = (cols > 0) & (rows > 0)  # [B, C, 1]: a rectangle with area (else no window)
    num_cols, rows = int((cols * meets).max()), (rows * meets).ravel()  # [B * C]
    if num_cols * rows.sum() > _WINDOW_FRACTION * num_images * num_gts * height * width:
        return None
    start = np.minimum(first_col, width - num_cols)  # [B, C, 1]
    col = start + np.arange(num_cols)  # [B, C, cols]
    u1, u2 = u1[image, col], u2[image, col]
    inter_w = np.maximum(np.minimum(x2, u2) - np.maximum(x1, u1), 0).reshape(rows.size, -1)
    anchor_w = np.maximum(u2 - u1, 0).reshape(rows.size, -1)
    pair = np.repeat(np.arange(rows.size), rows)  # [R]
    row = first_row.ravel()[pair] + np.arange(pair.size) - np.repeat(rows.cumsum() - rows, rows)
    img = pair // num_gts
    v1, v2 = (v[img if len(level) > 1 else 0, row] for v in (v1, v2))  # [R]
    y1, y2 = y1.ravel()[pair], y2.ravel()[pair]
    inter_h = np.maximum(np.minimum(y2, v2) - np.maximum(y1, v1), 0)
    anchor_h = np.maximum(v2 - v1, 0)
    first = img * (height * width) + row * width + start.ravel()[pair]
    first = first.astype(np.int32 if num_images * height * width < 2**31 else np.int64)
    return _Windows(
        *(torch.from_numpy(t) for t in (pair, first, inter_w, anchor_w, inter_h, anchor_h))
    )


def _span(
    lo_edges: np.ndarray, hi_edges: np.ndarray, lo: np.ndarray, hi: np.ndarray, image: object
) -> tuple[np.ndarray, np.ndarray]:
    """The cells of a sparse grid's row (or column) that boxes meet with positive length:
    ``lo_edges, hi_edges: [b, W]`` (the cells' x1 and x2, see ``_Grid.sparse``), ``lo, hi:
    [B, C, 1]`` (the boxes' x1 and x2), ``image``: each box's image in the edges (``0`` where
    the images share them) -> the first cell and the cells' count (``int64 [B, C, 1]`` each).

    A cell meets a box where its x1 lies below the box's x2 (a prefix of the cells), its x2
    above the box's x1 (a suffix) and the box has positive length.
    """
    if isinstance(image, int):
        first = np.searchsorted(hi_edges[0], lo, side="right")  # [B, C, 1]
        stop = np.searchsorted(lo_edges[0], hi, side="left")
    else:
        edges_lo = zip(hi_edges, lo, strict=True)
        first = np.stack([np.searchsorted(e, v, side="right") for e, v in edges_lo])
        edges_hi = zip(lo_edges, hi, strict=True)
        stop = np.stack([np.searchsorted(e, v, side="left") for e, v in edges_hi])
    return first, np.where(hi > lo, stop - first, 0).clip(min=0)


def _best_in_windows(
    windows: _Windows, gt_area: Tensor, work: Tensor, value: Tensor, index: Tensor
) -> None:
    """``best_of_chunk`` of the IoUs of ``[B, C]`` ground truths (``gt_area: [B, C]``) with the
    anchors of a grid level, from their ``windows`` (``_windows``), to the bit: written into
    ``value: float32 [B, n]`` and ``index: int64 [B, n]`` (``n`` the level's anchors). ``work`` is
    scratch (``_workspace``).

    The IoUs are ``_iou_into``'s operations, in the windows only (an anchor's area is its width
    times its height there too). An anchor's best IoU is the largest in the windows over it, or
    0 (its other IoUs are 0), and its ground truth the first that reaches it, or 0 where that is
    0 (all its IoUs are 0): what ``best_of_chunk`` gives. One ``scatter_reduce`` finds both, on
    ``int64`` keys that order as ``(IoU, -ground truth)``: the IoU's bits (which order
    non-negative floats as their values) above ``C - 1 - g``.
    """
    num_gts = gt_area.shape[1]
    shape = (windows.pair.shape[0], windows.inter_w.shape[1])  # [R, cols]
    size = math.prod(shape)
    specs = [(value.dtype, size)] * 2 + [(torch.int64, size), (windows.first.dtype, size)]
    inter, union, key, cell, best = _scratch_views(work, [*specs, (torch.int64, value.numel())])
    inter, union, key, cell = (t.view(shape) for t in (inter, union, key, cell))
    pair = windows.pair
    torch.index_select(windows.inter_w, 0, pair, out=inter).mul_(windows.inter_h[:, None])
    torch.index_select(windows.anchor_w, 0, pair, out=union).mul_(windows.anchor_h[:, None])
    union += gt_area.reshape(-1).index_select(0, pair)[:, None]
    union -= inter
    # The low 32 bits: C - 1 - g, written as whole keys (contiguous: three times faster than a
    # half's strided writes), whose high halves then take the IoU's bits.
    key.copy_((num_gts - 1 - pair % num_gts)[:, None])
    halves = key.view(value.dtype).view(*shape, 2)  # the 32-bit halves of each key, in memory
    torch.div(inter, union.clamp_(min=_EPS), out=halves[..., _HIGH])
    torch.add(windows.first[:, None], torch.arange(shape[1], dtype=cell.dtype), out=cell)
    # An anchor no window gives a positive IoU keeps the first ground truth (key C - 1): IoU 0.
    best = best.fill_(num_gts - 1).scatter_reduce_(0, cell.view(-1), key.view(-1), "amax")
    best_halves = best.view(torch.int32).view(*value.shape, 2)
    value.copy_(best_halves[..., _HIGH].view(value.dtype))
    torch.sub(num_gts - 1, best_halves[..., 1 - _HIGH], out=index)


def _best_of(
    segments: Sequence[_Grid | tuple[int, int]],
    gts: Tensor,
    candidate: Tensor,
    corners: Tensor,
    area: Tensor,
    work: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """What the ``[B, C, N]`` IoU matrix of ``gts: [B, C, 4]`` and the anchors (``corners``,
    ``area`` as ``_iou_into`` takes them) is needed for: the IoUs of the ``candidate: [B, C, K]``
    anchors, and ``best_of_chunk`` of it -> ``(cand_iou [B, C, K], value [B, N], index int64
    [B, N])``, the same bits.

    Large sparse grid levels take their windows (``_best_in_windows``) where they have them, the
    other anchors their columns of the matrix, computed in ``work: [3, M]``.
    """
    num_images, num_gts = gts.shape[:2]
    windows = [
        _windows(seg, gts, corners)
        if isinstance(seg, _Grid)
        and seg.sparse
        and num_images * num_gts * (seg.stop - seg.start) >= _WINDOW_MIN_ELEMENTS
        else None
        for seg in segments
    ]
    spans = [(s.start, s.stop) if isinstance(s, _Grid) else s for s in segments]
    dense = [seg for seg, win in zip(segments, windows, strict=True) if win is None]
    num_dense = sum(hi - lo for (lo, hi), win in zip(spans, windows, strict=True) if win is None)
    if num_dense:
        shape = (num_images, num_gts, num_dense)
        mat, tmp, tmp2 = (w[: math.prod(shape)].view(shape) for w in work)
        iou = _iou_into(dense, gts, corners, area, mat, (tmp, tmp2))  # [B, C, n]
        if num_dense == area.shape[1]:  # the matrix holds the candidates' IoUs
            cand_iou = iou.gather(2, candidate)  # [B, C, K]
            return cand_iou, *best_of_chunk(iou)  # overwrites iou
        dense_value, dense_index = best_of_chunk(iou)  # [B, n]; overwrites iou
    gt_area = box_area(gts)  # [B, C]
    cand_iou = _candidate_iou(gts, gt_area, candidate, corners, area)
    value = area.new_empty(area.shape)  # [B, N]
    index = torch.empty_like(value, dtype=torch.int64)
    at = 0
    for (lo, hi), win in zip(spans, windows, strict=True):
        if win is not None:
            _best_in_windows(win, gt_area, work, value[:, lo:hi], index[:, lo:hi])
        else:
            value[:, lo:hi] = dense_value[:, at : at + hi - lo]
            index[:, lo:hi] = dense_index[:, at : at + hi - lo]
            at += hi - lo
    return cand_iou, value, index


def _assign_block(
    batch: Batch,
    num_per_level: Sequence[int],
    level_k: Sequence[int],
    center_margin: float,
    chunk_size: int,
    work: Tensor,
    grids: Sequence[_Grid | None],
    search: dict[int, int],
) -> list[Assignment]:
    """``assign_atss`` on one block of images (see ``Batch.blocks``); ``work: [3, M]`` scratch
    for its ``[B, C, N]`` matrices; ``grids``: each level's grid (``_find_grids``) or ``None``;
    ``search``: the grid levels whose nearest anchors are found on the grid (first anchor ->
    ``k``)."""
    anc, gts = batch.candidates, batch.gt_boxes  # [B, N, 4], [B, G, 4]
    num_images, num_anchors = anc.shape[:2]
    if num_anchors == 0:  # nothing to rank, and the reductions below need something
        zeros = anc.new_zeros(num_images, 0)
        return batch.split(zeros.to(torch.int8), zeros.to(torch.int64), zeros)
    # Images sharing their anchors (a broadcast view, see ``prepare_batch``) share these too.
    # ``box_centers`` and ``box_area``'s arithmetic, on contiguous planes (several times faster
    # than on [..., N, 4] rows).
    corners = (anc[:1] if anc.stride(0) == 0 else anc).transpose(1, 2).contiguous()  # [b, 4, N]
    centers = ((corners[:, :2] + corners[:, 2:]) / 2).expand(num_images, 2, num_anchors)
    wh = (corners[:, 2:] - corners[:, :2]).clamp_(min=0)  # [b, 2, N]
    area = (wh[:, 0] * wh[:, 1]).expand(num_images, num_anchors)  # [B, N]
    corners = corners.expand(num_images, 4, num_anchors)
    # Ignored anchors are chosen last: at infinite distance, ranked by index among themselves.
    near = centers if batch.ignored is None else centers.masked_fill(batch.ignored[:, None], _INF)
    segments = _segments(num_anchors, grids, search)

    best_iou = best_gt = None
    parts: list[tuple[Tensor, Tensor, Tensor]] = []  # per chunk: candidates, their IoUs, positive
    for start in range(0, gts.shape[1], chunk_size):
        chunk = gts[:, start : start + chunk_size]  # [B, C, 4]
        shape = (num_images, chunk.shape[1], num_anchors)
        mat, tmp = (w[: math.prod(shape)].view(shape) for w in work[:2])
        gt_centers = box_centers(chunk)  # [B, C, 2]
        found = _distance_into(segments, near, centers, batch.ignored, gt_centers, mat, tmp, search)
        # Ties (anchors sharing a location always tie) go to the lower anchor index.
        candidate = _nearest(mat, num_per_level, level_k, found)  # [B, C, K]

        # Padded ground truths have IoU 0 with everything: they never win a max from the real ones
        # before them, and never pass the centre test.
        # The threshold and the centre test need only the K candidates of each ground truth.
        cand_iou, value, index = _best_of(
            segments, chunk, candidate, corners, area, work
        )  # [B, C, K], [B, N], [B, N]
        if best_iou is None:
            best_iou, best_gt = value, index
        else:
            better = value > best_iou  # strict: earlier chunks keep ties
            best_iou = torch.where(better, value, best_iou)
            best_gt = torch.where(better, index + start, best_gt)

        flat = candidate.flatten(1)  # [B, C * K]
        cx = centers[:, 0].gather(1, flat).view_as(candidate)
        cy = centers[:, 1].gather(1, flat).view_as(candidate)
        positive = (
            (cand_iou >= _adaptive_threshold(cand_iou))
            & _center_inside(cx, cy, chunk, center_margin)
            & batch.gt_valid[:, start : start + chunk_size, None]
        )
        parts.append((candidate, cand_iou, positive))

    # [B, G, K] each
    candidate, cand_iou, positive = (torch.cat(p, dim=1) for p in zip(*parts, strict=True))
    flat = candidate.flatten(1)  # [B, G * K]
    # An anchor positive for several ground truths takes the highest IoU, then the first of them.
    pos_iou = torch.full_like(best_iou, -_INF).scatter_reduce_(
        1, flat, cand_iou.masked_fill(~positive, -_INF).flatten(1), "amax"
    )  # [B, N]
    winner = positive & (cand_iou == pos_iou.gather(1, flat).view_as(cand_iou))
    gt_number = torch.arange(gts.shape[1], device=anc.device)[:, None]  # [G, 1]
    pos_gt = torch.full_like(best_gt, gts.shape[1]).scatter_reduce_(
        1, flat, torch.where(winner, gt_number, gts.shape[1]).flatten(1), "amin"
    )  # [B, N]

    is_pos = pos_iou > -_INF
    label = torch.zeros_like(best_gt, dtype=torch.int8)  # [B, N]
    if batch.ignored is not None:
        label.masked_fill_(batch.ignored, IGNORE)
    label.masked_fill_(is_pos, POSITIVE)
    gt_index = torch.where(is_pos, pos_gt, best_gt)
    max_iou = torch.where(is_pos, pos_iou, best_iou)
    return batch.split(label, gt_index, max_iou)
