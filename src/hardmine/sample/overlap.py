"""The Overlap Sampler: pick by the overlap among examples (Chen et al., "Overlap Sampler for
Region-Based Object Detection", WACV 2020; ``papers/overlap_sampler_chen_wacv2020.txt``).

The paper links its code (github.com/ChenJoya/overlap-sampler), since folded into the authors'
``sampling-free`` repository, whose ``OvSampler`` implements the soft negative sampler only, with
bins split at the midpoint of each image's observed IoU(p,n) range. Every choice the paper's text
leaves open, or that its code makes differently, is written down in ``sample_overlap``'s
docstring, the text's reading as the default and the others by name.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import accumulate
from typing import ClassVar, Literal, NamedTuple, get_args

import torch
from torch import Tensor

from hardmine.boxes import _EPS as BOX_EPS
from hardmine.boxes import box_area, check_boxes, check_finite, upcast
from hardmine.sample.quota import (
    FlatBatch,
    check_call,
    count_per_segment,
    draw,
    fill_shortfall,
    flatten,
    segment_by_key,
    take_top_in_segments,
)
from hardmine.structures import NEGATIVE, POSITIVE, Assignment, Selection, check_fields, settings

Strategy = Literal["uniform", "hard", "soft", "linear"]
Bins = Literal["fixed", "observed"]
EpsilonOn = Literal["best_proposal", "any_positive"]


def check_overlap_settings(
    *,
    num: int,
    pos_fraction: float,
    strategy: str,
    pos_strategy: str,
    num_bins: int,
    hard_thr: float,
    upper: float,
    bins: str,
    linear_top_up: bool,
    epsilon: float,
    epsilon_on: str,
    gt_copies_in_pe: bool,
    gt_copies_in_pn: bool,
) -> None:
    """Raise ``ValueError`` naming the first setting of ``sample_overlap`` out of its range."""
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if not 0.0 <= pos_fraction <= 1.0:
        raise ValueError(f"pos_fraction must be in [0, 1], got {pos_fraction}")
    for name, value, valid in (
        ("strategy", strategy, Strategy),
        ("pos_strategy", pos_strategy, Strategy),
        ("bins", bins, Bins),
        ("epsilon_on", epsilon_on, EpsilonOn),
    ):
        if value not in get_args(valid):
            raise ValueError(f"{name} must be one of {get_args(valid)}, got {value!r}")
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    if not 0.0 <= hard_thr <= 1.0:
        raise ValueError(f"hard_thr must be in [0, 1], got {hard_thr}")
    if not 0.0 < upper <= 1.0:
        raise ValueError(f"upper must be in (0, 1], got {upper}")
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")


@dataclass(frozen=True)
class OverlapSampler:
    """``sample_overlap`` as a ``Sampler``; its fields are the settings (see there).

    The defaults are the paper's best setting, Table 2(f)'s last column: soft negatives with
    K = 2, soft positives, ε = 2; that column also sets the detector's inference NMS threshold to
    θ = 0.55 (Table 2(c)), a model setting: ``box_nms_thresh=0.55`` in torchvision
    (``hardmine compare --methods overlap_best`` sets both).
    """

    num: int = 512
    pos_fraction: float = 0.25
    strategy: Strategy = "soft"
    pos_strategy: Strategy = "soft"
    num_bins: int = 2
    hard_thr: float = 0.5
    upper: float = 0.7
    bins: Bins = "fixed"
    linear_top_up: bool = False
    epsilon: float = 2.0
    epsilon_on: EpsilonOn = "best_proposal"
    gt_copies_in_pe: bool = False
    gt_copies_in_pn: bool = True
    needs_losses: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_fields(self)
        check_overlap_settings(**settings(self))

    def __call__(
        self,
        boxes: Sequence[Tensor],
        assignments: Sequence[Assignment],
        *,
        losses: Sequence[Tensor] | None = None,
        mined: Sequence[Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> list[Selection]:
        check_call(boxes, assignments, generator)
        return sample_overlap(boxes, assignments, **settings(self), generator=generator)


def overlap_with_positives(
    boxes: Tensor,
    flat: FlatBatch,
    positive: Tensor,
    *,
    with_pe: bool = True,
    examples: Tensor | None = None,
    budget: int = 1 << 18,
) -> tuple[Tensor, Tensor]:
    """Each candidate's largest IoU with a positive of its image, and each positive's with another.

    Only pairs of boxes that intersect have an IoU above 0, the floor of both maxima. On the CPU,
    the positives are grouped by ground truth, and each group is compared only with the
    candidates that intersect the union box of its positives, which holds every box of the group
    (``_sparse_overlaps``); about a fifth of all pairs for proposals around their ground truths.
    On other devices, and where that is no smaller, every candidate is compared with every
    positive of its image (``_dense_overlaps``); the CUDA path so stays free of host
    synchronisation beyond the one read of the positives' count. Where positives crowd around
    their ground truths (thousands of proposals each), pairs grow as their square; there the CPU
    searches k-d trees of the boxes by branch and bound instead (``_tree_overlaps``). All compute
    each IoU as ``box_iou`` does, so the maxima are the same to the bit.

    Args:
        boxes: ``float [N, 4]``, the flat batch's candidates.
        flat: the batch.
        positive: ``bool [N]``.
        with_pe: also compute ``iou_pe`` (else it is all 0).
        examples: ``bool [N]``, the candidates that count as the *other* candidates of
            ``iou_pe``; all when None.
        budget: IoUs per block; memory stays bounded by it whatever the number of positives.

    Returns:
        ``iou_pn: float [N]``: max IoU with any positive of the same image (a positive's own IoU
        of 1 included; 0 in an image without positives), and ``iou_pe: float [N]``: for
        positives, max IoU with any *other* candidate of the image among ``examples``, 0
        elsewhere. ``float32`` for half-precision boxes.

    Raises:
        ValueError: non-finite or overflowing boxes (``hardmine.boxes.check_boxes``).
    """
    check_boxes(boxes, "boxes")
    return _overlaps(boxes, flat, positive, with_pe=with_pe, examples=examples, budget=budget)


def _overlaps(
    boxes: Tensor,
    flat: FlatBatch,
    positive: Tensor,
    *,
    with_pe: bool = True,
    examples: Tensor | None = None,
    budget: int = 1 << 18,
    pn_key: _Key | None = None,
    pe_key: _Key | None = None,
    pn_read: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``overlap_with_positives``, where only a key of each maximum may be wanted.

    A key is a monotone map of IoUs (a soft bin's index, the side of the hard threshold): with
    ``pn_key``, each value of ``iou_pn`` is one of the candidate's IoUs with a positive whose key
    is the maximum's, not necessarily the maximum (likewise ``pe_key``). The sampler reads no
    more than the key, which a few IoUs settle for most candidates (``_keyed_overlaps``, on the
    CPU, above ``_KEYED_ABOVE`` candidates). With ``pn_read: bool [N]``, only those candidates'
    ``iou_pn`` is wanted; the others may be 0. On the CPU, where ``_sparse_overlaps`` would
    compare more pairs per candidate than ``_TREE_ABOVE``, trees of the boxes take over
    (``_tree_overlaps``).
    """
    boxes = upcast(boxes)  # the maxima are stored in the boxes' type: never a half one
    n = boxes.shape[0]
    pos_count = flat.count(positive)  # [B]
    # The one host read: P_max sizes the padded positives. It follows input validation, which
    # synchronises anyway.
    p_max = int(pos_count.max()) if n else 0
    if p_max == 0:
        return boxes.new_zeros(n), boxes.new_zeros(n)
    planes = torch.cat([boxes, box_area(boxes)[:, None]], 1)  # [N, 5]: x1, y1, x2, y2, area
    if boxes.device.type == "cpu":
        if pn_key is not None and (pe_key is not None or not with_pe) and n > _KEYED_ABOVE:
            return _keyed_overlaps(
                planes, flat, positive, with_pe, examples, budget, pn_key, pe_key, pn_read
            )
        most = _TREE_ABOVE[False] * n
        found = _sparse_overlaps(planes, flat, positive, with_pe, examples, budget, p_max, most)
        if found is not None:
            return found
        if flat.num_images * p_max * flat.max_size > most:
            return _tree_overlaps(planes, flat, positive, with_pe, examples, budget)
    return _dense_overlaps(planes, flat, positive, pos_count, p_max, with_pe, examples, budget)


def _keyed_overlaps(
    planes: Tensor,
    flat: FlatBatch,
    positive: Tensor,
    with_pe: bool,
    examples: Tensor | None,
    budget: int,
    pn_key: _Key,
    pe_key: _Key | None,
    pn_read: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """``_overlaps`` with keys, on the CPU: most keys are settled by a few IoUs each.

    Each candidate read is first compared with the ``_CENTRAL`` positives that overlap its ground
    truth most (``_central_overlaps``), each positive likewise with the other examples among
    them; where that reaches the largest key, it is the maximum's (most of them, with proposals
    around their ground truths). The candidates left are
    compared with the positives that may intersect them (``_sparse_overlaps``), or searched for
    in a tree of the positives where that would take more than ``_TREE_ABOVE`` IoUs per
    candidate; the positives left are compared with the examples by ``_others``.
    """
    n, b = planes.shape[0], flat.num_images
    read = torch.arange(n) if pn_read is None else pn_read.nonzero()[:, 0]
    pos_index = positive.nonzero()[:, 0]
    counted = torch.ones(n, dtype=torch.bool) if examples is None else examples
    iou_pn = planes.new_zeros(n)
    central = _central_positives(planes, flat, pos_index)
    iou_pn[read] = first = _central_overlaps(central, read, None)
    # The least IoU that may raise each candidate's key; infinite where nothing can (or unread).
    need = planes.new_full((n,), float("inf"))
    need[read] = pn_key.rise(first)
    rows = need < float("inf")
    pos_count = flat.count(positive)
    p_max = int(pos_count.max())
    most = _TREE_ABOVE[True] * n
    if bool(rows.any()):
        # The grouped path compares about (positives of a ground truth) x (candidates near it):
        # estimated by the candidates left that are matched to it, before listing any pair.
        group, span = central.group, central.span  # [N]: (image, ground truth)
        pairs = torch.bincount(group[pos_index], minlength=b * span)
        pairs *= torch.bincount(group[rows], minlength=b * span)
        found = None
        if int(pairs.sum()) <= _PAIRS_ABOVE * n:
            found = _sparse_overlaps(
                planes, flat, positive, False, None, budget, p_max, most, need, central
            )
        if found is None and b * p_max * flat.max_size <= most:
            found = _dense_overlaps(planes, flat, positive, pos_count, p_max, False, None, budget)
        if found is not None:
            torch.maximum(iou_pn, found[0], out=iou_pn)
        else:
            tree = _build_tree(planes[pos_index], flat.image[pos_index], b)
            q = rows.nonzero()[:, 0]
            iou_pn[q] = _search_tree(
                tree, planes[q], flat.image[q], None, budget, pn_key, iou_pn[q]
            )
    iou_pe = planes.new_zeros(n)
    if with_pe:
        found = _central_overlaps(central, pos_index, counted)
        todo = torch.arange(pos_index.shape[0])
        if pe_key is not None:
            todo = (pe_key.rise(found) < float("inf")).nonzero()[:, 0]
        iou_pe[pos_index] = _others(planes, flat, pos_index, todo, counted, found, budget, pe_key)
    return iou_pn, iou_pe


def _iou_block(cand: Tensor, pos: Tensor) -> Tensor:
    """IoUs of candidates and positives from their planes, as ``iou_matrix`` computes them.

    ``cand: [5, ...]`` and ``pos: [5, ...]`` (``x1, y1, x2, y2, area``) broadcast to the block's
    shape; the candidates vary along its last, contiguous axis, which keeps every pass a
    vectorised sweep (the transposed layout, with a short last axis, costs the CPU several times
    more). Same operations in the same order as ``iou_matrix``: the same values to the bit.
    """
    w = torch.minimum(cand[2], pos[2])
    w -= torch.maximum(cand[0], pos[0])
    h = torch.minimum(cand[3], pos[3])
    h -= torch.maximum(cand[1], pos[1])
    inter = w.clamp_(min=0).mul_(h.clamp_(min=0))
    union = cand[4] + pos[4]
    union -= inter
    return inter.div_(union.clamp_(min=BOX_EPS))


def _group_bounds(planes: Tensor, size: Tensor) -> Tensor:
    """The ``_bound_block`` node of each run of ``planes: [P, 5]``, ``size: int64 [G]`` long
    (none empty) -> ``[11, G]``: least and greatest x1, y1, x2, y2, least width, height, area."""
    x1, y1, x2, y2, area = planes.unbind(1)
    width, height = (x2 - x1).clamp_(min=0), (y2 - y1).clamp_(min=0)
    least = torch.stack([x1, y1, x2, y2, width, height, area], 1)  # [P, 7]
    least = torch.segment_reduce(least, "min", lengths=size, axis=0, unsafe=True)  # [G, 7]
    most = torch.segment_reduce(planes[:, :4], "max", lengths=size, axis=0, unsafe=True)
    corners = torch.stack([least[:, :4], most], 2).view(-1, 8)  # [G, 8]: least, greatest x1, ...
    return torch.cat([corners, least[:, 4:]], 1).T.contiguous()


def _dense_overlaps(
    planes: Tensor,
    flat: FlatBatch,
    positive: Tensor,
    pos_count: Tensor,
    p_max: int,
    with_pe: bool,
    examples: Tensor | None,
    budget: int,
) -> tuple[Tensor, Tensor]:
    """``overlap_with_positives`` over every (positive, candidate) pair of each image.

    The batch is padded to ``[B, 5, N_max]`` planes and compared with its positives padded to
    ``[B, P_max]``, a chunk of positives at a time. Chunks hold about ``budget`` IoUs, so memory
    stays bounded whatever ``P_max`` is, and the blocks stay small enough to live in cache (the
    arithmetic per IoU is tiny, so memory traffic is what costs). Padding is zero-area boxes,
    whose IoU with anything is 0, the floor of both maxima anyway.
    """
    b, size = flat.num_images, flat.max_size
    row = flat.position
    padded = planes.new_zeros(b, size, 5)
    padded[flat.image, row] = planes
    padded = padded.transpose(1, 2)[:, :, None]  # [B, 5, 1, N_max]
    rank = torch.cumsum(positive, 0) - 1 - (torch.cumsum(pos_count, 0) - pos_count)[flat.image]
    col = torch.where(positive, rank, p_max)  # non-positives land in a spare column, dropped
    pos_planes = planes.new_zeros(b, p_max + 1, 5)
    pos_planes[flat.image, col] = planes
    pos_planes = pos_planes[:, :p_max].transpose(1, 2)[..., None]  # [B, 5, P_max, 1]
    pos_row = torch.zeros((b, p_max + 1), dtype=torch.int64, device=planes.device)
    pos_row[flat.image, col] = row
    pos_row = pos_row[:, :p_max, None]  # [B, P_max, 1]
    outside = None  # [B, 1, N_max]: candidates that are no example of iou_pe
    if with_pe and examples is not None:
        outside = torch.ones(b, 1, size, dtype=torch.bool, device=planes.device)
        outside[flat.image, 0, row] = ~examples

    chunk = max(1, budget // (b * size))
    best_pn = planes.new_zeros(b, size)  # [B, N_max]
    best_pe = planes.new_zeros(b, p_max)  # [B, P_max]
    for start in range(0, p_max, chunk):
        iou = _iou_block(padded.unbind(1), pos_planes[:, :, start : start + chunk].unbind(1))
        torch.maximum(best_pn, iou.amax(1), out=best_pn)  # iou: [B, c, N_max]
        if with_pe:
            # A positive's own IoU (1) would always win: zero that one cell per positive. Padded
            # positives point at column 0, where their IoU is 0 anyway.
            iou.scatter_(2, pos_row[:, start : start + chunk], 0)
            if outside is not None:
                iou.masked_fill_(outside, 0)
            best_pe[:, start : start + chunk] = iou.amax(2)
    iou_pn = best_pn[flat.image, row]
    iou_pe = torch.where(positive, best_pe[flat.image, rank.clamp(min=0)], 0)
    return iou_pn, iou_pe


# Candidates per tile of a group's list: long enough a contiguous axis for every pass to vectorise
# (shorter rows cost the CPU several times more per IoU), short enough to pad little. Half that
# with ``need``: the bounds leave a group a few dozen candidates, which longer tiles pad by half
# (at B = 16, 16 costs about 7% less than 32, and 8 more again).
_TILE = {False: 32, True: 16}


def _sparse_overlaps(
    planes: Tensor,
    flat: FlatBatch,
    positive: Tensor,
    with_pe: bool,
    examples: Tensor | None,
    budget: int,
    p_max: int,
    most: int | None = None,
    need: Tensor | None = None,
    central: _Central | None = None,
) -> tuple[Tensor, Tensor] | None:
    """``overlap_with_positives`` over the (positive, candidate) pairs that may intersect.

    The positives are grouped by (image, ground truth); a candidate can intersect a positive of a
    group only if it intersects the group's union box (every side of the union reaches at least
    as far as the positive's), so each group is compared with those candidates only: the pairs
    left out have an intersection of exactly 0, hence an IoU of 0, the floor of both maxima. Any
    grouping would be exact; ground truths make tight ones.

    Each group's candidates are listed in tiles (``_TILE``; padded with a zero-area box), the
    groups largest first, so that the groups holding a k-th positive own a prefix of the tiles;
    the positives are compared slot by slot, a chunk of slots at a time, with that prefix. The
    candidates that are no example of ``iou_pe`` get tiles of their own, left out of it.

    With ``need: float [N]`` (``with_pe`` False), only a key of ``iou_pn`` is wanted
    (``_keyed_overlaps``): only the candidates of finite ``need`` are listed (the others'
    ``iou_pn`` is 0), and each only in the groups whose ``_bound_block`` bound of the IoU with
    any of their positives reaches its ``need``; an IoU below it cannot raise the candidate's key.
    ``central`` (of ``positive``, ``_central_positives``) spares sorting the positives again.

    Reads sizes from the host throughout (CPU only). Returns None where it would compare no fewer
    pairs than ``_dense_overlaps``, or more than ``most``.
    """
    n, device = planes.shape[0], planes.device
    b, tile = flat.num_images, _TILE[need is not None]
    if central is None:
        pos_index = positive.nonzero()[:, 0]  # [P]
        gt = flat.gt_index[pos_index].clamp(min=0)
        key = flat.image[pos_index] * (int(gt.max()) + 1) + gt  # (image, ground truth)
        key, order = torch.sort(key, stable=True)
        pos_index = pos_index[order]
        _, pos_group, group_size = torch.unique_consecutive(
            key, return_inverse=True, return_counts=True
        )
        planes_t = torch.cat([planes, planes.new_zeros(1, 5)]).T.contiguous()  # [5, N + 1]
    else:  # the same grouping, already sorted
        pos_index, group_size, planes_t = central.ranked, central.size, central.table
        pos_group = torch.repeat_interleave(torch.arange(group_size.shape[0]), group_size)
    groups = group_size.shape[0]
    # Each group's union box, then where it lies in a [B, G_max] layout of the groups per image.
    group_first = torch.cumsum(group_size, 0) - group_size
    group_image = flat.image[pos_index[group_first]]  # [G]
    per_image = torch.bincount(group_image, minlength=b)
    local = (
        torch.arange(groups, device=device) - (torch.cumsum(per_image, 0) - per_image)[group_image]
    )
    g_max = int(per_image.max())
    pos_planes = planes.index_select(0, pos_index)  # [P, 5], sorted by group
    node = _group_bounds(pos_planes, group_size)  # [11, G]
    union = planes.new_empty(b, g_max, 4)
    union[..., :2], union[..., 2:] = float("inf"), float("-inf")  # padding meets nothing
    union[group_image, local] = node[[0, 2, 5, 7]].T  # least x1, y1, greatest x2, y2
    union = union[..., None]  # [B, G_max, 4, 1]
    if need is None:  # every candidate, at its position in its image
        size, row_image, row_position = flat.max_size, flat.image, flat.position
        listed_planes, candidate = planes, None
    else:  # only the candidates whose key may rise, packed at the front of each image's row
        candidate = (need < float("inf")).nonzero()[:, 0]  # [R]
        row_count = flat.count(need < float("inf"))  # [B]
        size = int(row_count.max())
        row_image = flat.image[candidate]
        row_position = (
            torch.arange(candidate.shape[0]) - (row_count.cumsum(0) - row_count)[row_image]
        )
        listed_planes = planes[candidate]
        candidate = candidate.new_full((b, size), n).index_put_(
            (row_image, row_position), candidate
        )  # [B, R_max]: the candidate in each place, n for padding
    padded = planes.new_zeros(b, size, 5)  # zero-area padding meets nothing either
    padded[row_image, row_position] = listed_planes
    cand = padded.transpose(1, 2)[:, None]  # [B, 1, 5, N_max]
    hit = torch.empty(b, g_max, size, dtype=torch.bool, device=device)
    step = max(1, budget // (b * size))  # groups per block: bounded temporaries
    for start in range(0, g_max, step):
        u = union[:, start : start + step]
        # Strict: a box meets the union's interior wherever it meets a positive's.
        meet = torch.minimum(cand[:, :, 2], u[:, :, 2]) > torch.maximum(cand[:, :, 0], u[:, :, 0])
        meet &= torch.minimum(cand[:, :, 3], u[:, :, 3]) > torch.maximum(cand[:, :, 1], u[:, :, 1])
        hit[:, start : start + step] = meet

    # Largest groups first: the groups with a k-th positive are then a prefix.
    by_size = torch.argsort(group_size, descending=True, stable=True)  # new -> old
    rename = torch.empty_like(by_size)
    rename[by_size] = torch.arange(groups, device=device)
    group_size, group_image = group_size[by_size], group_image[by_size]
    hit = hit.view(b * g_max, size)[group_image * g_max + local[by_size]]  # [G, N_max]
    node = node[:, by_size]
    pos_group = rename[pos_group]
    slot = torch.arange(pos_index.shape[0], device=device) - group_first[by_size][pos_group]
    # Entries (group, flag, row), flag 1 for candidates that are no example of iou_pe.
    split = with_pe and examples is not None and not bool(examples.all())
    flags = 2 if split else 1
    if split:
        is_example = torch.zeros(b, size, dtype=torch.bool, device=device)
        is_example[flat.image, flat.position] = examples
        is_example = is_example[group_image]  # [G, N_max]
        hit = torch.stack([hit & is_example, hit & ~is_example], 1)
    hit = hit.view(groups, flags, size)
    entries = hit.nonzero()  # [E, 3]: (group, flag, row), sorted
    if candidate is None:
        entry_candidate = flat.bounds[group_image[entries[:, 0]]] + entries[:, 2]  # [E]
    else:
        entry_candidate = candidate.view(-1)[group_image[entries[:, 0]] * size + entries[:, 2]]
        # The margin of _search_tree: the bound is at least every IoU to the bit.
        margin = 1 + 64 * torch.finfo(planes.dtype).eps
        bound = _bound_block(_take(planes_t, entry_candidate), _take(node, entries[:, 0]))
        keep = bound.mul_(margin) >= need.index_select(0, entry_candidate)
        entries, entry_candidate = entries[keep], entry_candidate[keep]
    if entries.shape[0] == 0:  # no IoU above 0 (every positive has zero area), or none needed
        return planes.new_zeros(n), planes.new_zeros(n)
    segment = entries[:, 0] * flags + entries[:, 1]
    seg_count = torch.bincount(segment, minlength=groups * flags)
    seg_tiles = (seg_count + tile - 1) // tile
    group_tiles = seg_tiles.view(groups, flags).sum(1)  # [G]
    tiles = 1 + int(group_tiles.sum())  # tile 0: padding only, the "nowhere" of own cells
    # Compare the work with the dense path's before building anything large.
    sizes = group_size.tolist()
    prefix = list(accumulate(group_tiles.tolist(), initial=1))  # [G + 1]: tiles before group g
    k_max = sizes[0]
    chunk = max(1, budget // (tiles * tile))
    starts = range(0, k_max, chunk)
    # Groups with a k-th positive: sizes run largest first, so a bisection counts them.
    negated = [-s for s in sizes]
    active = [bisect_left(negated, -k) for k in starts]
    work = sum(min(chunk, k_max - k) * prefix[g] for k, g in zip(starts, active, strict=True))
    if work * tile >= b * p_max * size or (most is not None and work * tile > most):
        return None
    seg_first = torch.cumsum(seg_count, 0) - seg_count
    seg_start = (1 + torch.cumsum(seg_tiles, 0) - seg_tiles) * tile
    e = torch.arange(entries.shape[0], device=device)
    at = seg_start[segment] + e - seg_first[segment]  # [E]: place in the tiled list
    row = entries[:, 2]
    cand_of = torch.full((tiles * tile,), n, dtype=torch.int64, device=device)
    cand_of[at] = entry_candidate
    listed = _take(planes_t, cand_of).view(5, 1, tiles, tile)
    tile_segment = torch.repeat_interleave(torch.arange(groups * flags, device=device), seg_tiles)
    tile_group = torch.cat([tile_segment.new_tensor([groups]), tile_segment // flags])  # [T]
    left_out = torch.cat(
        [tile_segment.new_tensor([True], dtype=torch.bool), tile_segment % flags == 1]
    )
    # Positives by group and slot, [G + 1, K_max, 5]; group G is padding. Spread over the tiles
    # a chunk of slots at a time: the whole [T, K_max, 5] would outgrow the budget.
    table = planes.new_zeros(groups + 1, k_max, 5)
    table[pos_group, slot] = pos_planes
    best_pn = planes.new_zeros(tiles * tile)  # [L]
    iou_pe = planes.new_zeros(n)
    if with_pe:
        # A positive's own cell in the list, found by its (segment, row) key; 0 (padding) if absent.
        own_flag = 0 if not split else (~examples[pos_index]).long()
        own_key = (pos_group * flags + own_flag) * (size + 1) + flat.position[pos_index]
        entry_key = segment * (size + 1) + row
        found = torch.searchsorted(entry_key, own_key).clamp_(max=entry_key.shape[0] - 1)
        own = torch.zeros(k_max, groups, dtype=torch.int64, device=device)
        own[slot, pos_group] = torch.where(entry_key[found] == own_key, at[found], 0)
        best_pe = planes.new_zeros(k_max, groups)
    for k, g in zip(starts, active, strict=True):
        t = prefix[g]
        # Whole rows of the slots' planes per tile, then the block's layout [5, c, t]: several
        # times faster than gathering single values across the planes.
        per_tile = table[:, k : k + chunk].index_select(0, tile_group[:t]).permute(2, 1, 0)
        per_tile = per_tile.contiguous()[..., None]
        iou = _iou_block(listed[:, :, :t], per_tile)  # [c, t, TILE]
        flat_iou = iou.view(iou.shape[0], t * tile)
        torch.maximum(best_pn[: t * tile], flat_iou.amax(0), out=best_pn[: t * tile])
        if with_pe:
            flat_iou.scatter_(1, own[k : k + chunk, :g], 0)
            part = iou.amax(2).masked_fill_(left_out[:t], 0)  # [c, t]
            lengths = group_tiles[:g].expand(part.shape[0], -1)
            best_pe[k : k + chunk, :g] = torch.segment_reduce(
                part[:, 1:], "max", lengths=lengths, axis=1, unsafe=True, initial=0.0
            )
    iou_pn = planes.new_zeros(n + 1).scatter_reduce_(0, cand_of, best_pn, "amax")[:n]
    if with_pe:
        iou_pe[pos_index] = best_pe[slot, pos_group]
    return iou_pn, iou_pe


# Boxes per leaf of the trees of ``_tree_overlaps``: the IoUs are computed a whole leaf at a time.
_LEAF = 8
_SHIFT = _LEAF.bit_length() - 1
# Work of ``_sparse_overlaps`` (IoUs per candidate of the batch) above which trees cost less,
# for keyed maxima (``_keyed_overlaps``, on the candidates the central positives leave, in the
# pairs its bounds keep) and for exact ones (``_tree_overlaps``): measured on proposals around
# their ground truths (``benchmarks/scaling.py``, 20 ground truths: the trees overtake between
# 48,000 and 64,000 proposals per image keyed, work about 260 and 360; between 16,000 and
# 32,000 exact).
_TREE_ABOVE = {True: 300, False: 1000}
# The same for ``_keyed_overlaps``, estimated before listing the pairs: (positives of a ground
# truth) x (candidates left matched to it), per candidate of the batch. 20 ground truths:
# about 40 at 8,000 proposals per image, 80 at 16,000, 160 at 32,000, 320 at 64,000.
_PAIRS_ABOVE = 240
# Candidates per batch above which keys pay: below, ``_keyed_overlaps``'s passes cost more than
# they save (measured on proposals around their ground truths).
_KEYED_ABOVE = 2048
# Positives per ground truth that ``_central_overlaps`` compares each candidate with.
_CENTRAL = 4
# Positives whose IoU(p,e) is left open (``_others``) are compared with every candidate of their
# image where that is at most this many IoUs per candidate of the batch; else with a tree.
_BRUTE_MOST = 16


def _tree_overlaps(
    planes: Tensor,
    flat: FlatBatch,
    positive: Tensor,
    with_pe: bool,
    examples: Tensor | None,
    budget: int,
) -> tuple[Tensor, Tensor]:
    """``overlap_with_positives`` by branch and bound in trees of boxes, in about linear time.

    ``iou_pn`` searches a k-d tree of each image's positives for each candidate
    (``_search_tree``). For ``iou_pe``, each positive first meets the other examples of its leaf
    of that tree, its nearest neighbours, then searches a tree of its image's examples
    (``_others``). Reads sizes from the host (CPU only).
    """
    n, b = planes.shape[0], flat.num_images
    pos_index = positive.nonzero()[:, 0]  # [P]
    tree = _build_tree(planes[pos_index], flat.image[pos_index], b)
    iou_pn = _search_tree(tree, planes, flat.image, None, budget, None)
    iou_pe = planes.new_zeros(n)
    if with_pe:
        counted = torch.ones(n, dtype=torch.bool) if examples is None else examples
        found = _leaf_mates(tree, counted[pos_index])  # [P]
        todo = torch.arange(pos_index.shape[0])
        iou_pe[pos_index] = _others(planes, flat, pos_index, todo, counted, found, budget, None)
    return iou_pn, iou_pe


def _others(
    planes: Tensor,
    flat: FlatBatch,
    pos_index: Tensor,
    todo: Tensor,
    counted: Tensor,
    found: Tensor,
    budget: int,
    key: _Key | None,
) -> Tensor:
    """IoU(p,e) of the positives ``pos_index[todo]``, at least ``found: [P]``, the IoUs known.

    Where they are few, each is compared with every ``counted`` candidate of its image
    (``_dense_overlaps``); else they search a k-d tree of those, their own box left out.
    Returns ``found`` raised to the maxima (their keys, with ``key``): ``[P]``.
    """
    n, b = planes.shape[0], flat.num_images
    if todo.shape[0] == 0:  # the usual case with keys: the central positives settled them all
        return found
    left = torch.zeros(n, dtype=torch.bool)
    left[pos_index[todo]] = True
    left_count = flat.count(left)
    left_max = int(left_count.max()) if n else 0
    found = found.clone()
    if left_max == 0:
        return found
    query = pos_index[todo]
    if b * left_max * flat.max_size <= _BRUTE_MOST * n:
        _, pe = _dense_overlaps(planes, flat, left, left_count, left_max, True, counted, budget)
        found[todo] = torch.maximum(found[todo], pe[query])
        return found
    ex_index = counted.nonzero()[:, 0]  # [X]
    rank = torch.full((n,), -1, dtype=torch.int64)
    rank[ex_index] = torch.arange(ex_index.shape[0])
    tree = _build_tree(planes[ex_index], flat.image[ex_index], b)
    found[todo] = _search_tree(
        tree, planes[query], flat.image[query], rank[query], budget, key, found[todo]
    )
    return found


class _Central(NamedTuple):
    """The ``_CENTRAL`` positives of each (image, ground truth) group that overlap its ground
    truth most (``_central_positives``), for ``_central_overlaps``."""

    group: Tensor  # int64 [N]: each candidate's (image, ground truth) number
    span: int  # ground-truth numbers per image in ``group``
    index: Tensor  # int64 [G + 1, C]: the group's central positives, N where it has fewer
    lookup: Tensor  # int64 [B * span]: a group number's row of ``index`` (G: none)
    table: Tensor  # [5, N + 1]: the candidates' planes, column N a box of IoU 0
    ranked: Tensor  # int64 [P]: the positives by group, then by overlap with the ground truth
    size: Tensor  # int64 [G]: positives per group
    planes: Tensor  # [5 * C, G + 1]: the planes of ``index``, x1 of each, then y1, ...


def _central_positives(planes: Tensor, flat: FlatBatch, pos_index: Tensor) -> _Central:
    """Each (image, ground truth) group's ``_CENTRAL`` positives of ``pos_index: int64 [P]``
    that overlap the ground truth most (in ``float32``), ties to the lower index.

    Which positives are central changes only how many candidates they settle, never a key: the
    float32 overlaps serve for any type of ``max_iou``.
    """
    n = planes.shape[0]
    span = int(flat.gt_index.max()) + 2
    group = flat.image * span + flat.gt_index + 1  # [N]: (image, ground truth)
    # One stable sort of int64 keys, the group in the high 32 bits and the overlap, largest
    # first, in the low 32, instead of a float sort and a group sort (a float sort alone costs
    # about twice an int64 one). The float's bits, all but the sign flipped for negatives, are an
    # integer of the same order.
    bits = flat.max_iou.index_select(0, pos_index).to(torch.float32).view(torch.int32)
    ordered = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64)  # [P]: the overlaps' order
    pos_group = group.index_select(0, pos_index)
    order = torch.argsort(pos_group * (1 << 32) + ((1 << 31) - 1 - ordered), stable=True)
    ranked = pos_index[order]  # by group, then by overlap with the ground truth
    keys, size = torch.unique_consecutive(pos_group[order], return_counts=True)
    j = torch.arange(_CENTRAL)
    at = (torch.cumsum(size, 0) - size)[:, None] + j  # [G, C]
    central = torch.where(j < size[:, None], ranked[at.clamp(max=ranked.shape[0] - 1)], n)
    central = torch.cat([central, central.new_full((1, _CENTRAL), n)])  # group G: none
    lookup = torch.full((flat.num_images * span,), keys.shape[0], dtype=torch.int64)
    lookup[keys] = torch.arange(keys.shape[0])
    table = torch.cat([planes, planes.new_zeros(1, 5)]).T.contiguous()  # [5, N + 1]; N: IoU 0
    # Gathered once: each query then reads a small table, not columns across all the planes.
    near = _take(table, central.T.reshape(-1)).view(5 * _CENTRAL, -1)
    return _Central(group, span, central, lookup, table, ranked, size, near)


def _central_overlaps(central: _Central, query: Tensor, counted: Tensor | None) -> Tensor:
    """Each candidate's largest IoU with the central positives of its ground truth
    (``_central_positives``): a lower bound of ``iou_pn``, or with ``counted: bool [N]`` (the
    others left out, and the query itself) of ``iou_pe``. ``query: int64 [Q]`` lists the
    candidates -> ``[Q]`` (0 where the ground truth has no positive)."""
    row = central.lookup.index_select(0, central.group.index_select(0, query))
    near = _take(central.planes, row).view(5, _CENTRAL, -1)  # [5, C, Q]
    iou = _iou_block(_take(central.table, query)[:, None], near)  # [C, Q]
    if counted is not None:
        pick = central.index.index_select(0, row).T  # [C, Q]
        out = ~torch.cat([counted, counted.new_zeros(1)])[pick] | (pick == query)
        iou.masked_fill_(out, 0)  # the floor of the maximum
    return iou.amax(0)


def _leaf_mates(tree: _Tree, counted: Tensor) -> Tensor:
    """Each box's largest IoU with another box of its leaf that is ``counted: bool [R]``."""
    leaves = tree.leaves.view(5, _LEAF, -1)  # [5, LEAF, leaves]
    iou = _iou_block(leaves[:, :, None], leaves[:, None])  # [LEAF, LEAF, leaves]
    mask = torch.zeros(leaves.shape[2] * _LEAF, dtype=torch.bool)
    mask[tree.slot_of] = counted
    mask = mask.view(-1, _LEAF).T[None] & ~torch.eye(_LEAF, dtype=torch.bool)[..., None]
    best = iou.masked_fill_(~mask, 0).amax(1)  # [LEAF, leaves]
    return best.T.reshape(-1).index_select(0, tree.slot_of)


def _take(table: Tensor, index: Tensor) -> Tensor:
    """``table[:, index]`` for ``table: [K, M]``, ``index: int64 [E]`` -> ``[K, E]``, a row at a
    time: on the CPU a fraction of the time ``index_select`` takes across rows."""
    out = table.new_empty(table.shape[0], index.shape[0])
    for row, dest in zip(table, out, strict=True):
        torch.index_select(row, 0, index, out=dest)
    return out


def _bound_block(query: Tensor, node: Tensor) -> Tensor:
    """An upper bound of the IoU of ``query: [5, ...]`` planes with any box of a node.

    ``node: [11, ...]``: the least and greatest x1, y1, x2, y2 (in pairs), the least width and
    height, and the least area of the node's boxes. The intersection is at most what the extreme
    corners allow; the union is at least the query's area plus what any box of the node must
    stick out of it (a strip left, right, above or below, at least the node's least height or
    width across), and at least both areas less the intersection. Exact arithmetic; see
    ``_search_tree`` for the rounding.
    """
    w = torch.minimum(query[2], node[5])
    w -= torch.maximum(query[0], node[0])
    h = torch.minimum(query[3], node[7])
    h -= torch.maximum(query[1], node[2])
    inter = w.clamp_(min=0).mul_(h.clamp_(min=0))
    torch.minimum(inter, query[4], out=inter)
    out_x = (query[0] - node[1]).clamp_(min=0) + (node[4] - query[2]).clamp_(min=0)
    out_y = (query[1] - node[3]).clamp_(min=0) + (node[6] - query[3]).clamp_(min=0)
    out = torch.maximum(out_x.mul_(node[9]), out_y.mul_(node[8]))
    union = query[4] + node[10]
    union -= inter
    torch.maximum(union, out.add_(query[4]), out=union)
    return inter.div_(union.clamp_(min=BOX_EPS))


def _kd_order(table: Tensor, filled: Tensor, height: Tensor) -> Tensor:
    """The slots of a k-d tree: a permutation of ``table: [S, 5]``'s rows -> ``int64 [S]``.

    ``table`` holds each image's boxes as a prefix of its aligned run of slots, padding after
    (``filled: bool [S]`` marks the boxes); ``height: [S]`` is the height of the subtree of the
    slot's image (in levels above the leaves of ``_LEAF``), -1 outside every image. From the top
    down, each node's boxes are sorted along the corner coordinate they spread most, so that its
    left child takes the lowest (all it holds) and the right one the rest, padding last: the
    tight nodes that ``_bound_block`` needs. Each node stays a prefix of boxes, so ``filled``
    holds for the result too.
    """
    slots = table.shape[0]
    order = torch.arange(slots)
    filled = filled.view(1, -1)
    columns = table[:, :4].T.masked_fill(~filled, float("inf")).unbind()  # 4 x [S]
    top = (1 << 21) - 1  # padding sorts last
    for level in range(int(height.max()), 0, -1):
        size = _LEAF << level
        corners = torch.stack(columns).view(4, -1, size)  # [4, nodes, size]
        low = corners.amin(2)  # padding: +inf
        span = torch.where(filled.view(1, -1, size), corners, float("-inf")).amax(2) - low
        axis = span.argmax(0)  # [nodes]
        at = axis * low.shape[1] + torch.arange(low.shape[1])
        start, width = low.view(-1).index_select(0, at), span.view(-1).index_select(0, at)
        pick = axis.repeat_interleave(size) * slots + torch.arange(slots)
        value = corners.view(-1).index_select(0, pick).view(-1, size)
        scaled = (
            value.sub_(start[:, None]).div_(width[:, None]).mul_(top - 1).nan_to_num_(0, top, 0)
        )
        scaled = scaled.long().clamp_(0, top).view(-1)
        # Nodes above their image's subtree keep their order: they may hold several images.
        keep = height < level
        position = torch.arange(slots)
        scaled = torch.where(keep, position & (size - 1), scaled)
        step = torch.sort(((position >> (level + _SHIFT)) << 21) | scaled).indices
        order = order.index_select(0, step)
        columns = [c.index_select(0, step) for c in columns]
    return order


@dataclass(frozen=True)
class _Tree:
    """Boxes in the leaves of a binary tree per image (``_build_tree``).

    Per level from the leaves up: ``bounds[k]: [11, nodes]`` (see ``_bound_block``); from level
    1: ``splits[k]``, the axis (x1, y1, x2, y2) along which the node was split and the left
    child's greatest coordinate along it (infinite where the right child is empty).
    ``leaves: [5 * _LEAF, leaves]`` holds the planes of each leaf's boxes (padding: a box that
    meets nothing); ``slot_of: [R]`` each box's slot; ``root, height: [B]`` each image's subtree
    (height -1: the image has no box).
    """

    bounds: list[Tensor]
    splits: list[tuple[Tensor, Tensor]]
    leaves: Tensor
    slot_of: Tensor
    root: Tensor
    height: Tensor


def _build_tree(ref: Tensor, ref_image: Tensor, num_images: int) -> _Tree:
    """A k-d tree of ``ref: float [R, 5]`` planes per image (``ref_image: int64 [R]``).

    Each image's boxes fill ``_LEAF``-box leaves, padded to a power of two; the images' runs of
    leaves are laid out largest first, so that each is aligned, the subtree of one node.
    """
    count = torch.bincount(ref_image, minlength=num_images)
    leaves = [-(-c // _LEAF) for c in count.tolist()]
    height = [max(c - 1, 0).bit_length() if c else -1 for c in leaves]
    top = max(height)
    offset, total = [0] * num_images, 0
    for i in sorted(range(num_images), key=lambda i: -height[i]):
        if leaves[i]:
            offset[i], total = total, total + (1 << height[i])
    slots = -(-total >> max(top, 0)) << max(top, 0) << _SHIFT  # whole nodes of the top level
    first = torch.tensor(offset) << _SHIFT  # [B]: each image's first slot
    order = torch.argsort(ref_image, stable=True)
    by_image = ref_image[order]
    slot_of = torch.empty_like(order)
    slot_of[order] = (
        first[by_image] + torch.arange(order.shape[0]) - (count.cumsum(0) - count)[by_image]
    )
    inf = float("inf")
    table = ref.new_tensor([inf, inf, -inf, -inf, inf]).repeat(slots, 1)  # padding meets nothing
    table[slot_of] = ref
    filled = torch.zeros(slots, dtype=torch.bool)
    filled[slot_of] = True
    slot_height = torch.full((slots,), -1, dtype=torch.int64)
    for i in range(num_images):
        if leaves[i]:
            slot_height[offset[i] << _SHIFT : (offset[i] + (1 << height[i])) << _SHIFT] = height[i]
    kd = _kd_order(table, filled, slot_height)
    table = table.index_select(0, kd)
    rank = torch.empty_like(kd)
    rank[kd] = torch.arange(slots)
    slot_of = rank.index_select(0, slot_of)
    # Bounds of the leaves, then of each level's pairs of nodes. The kd order keeps the boxes of
    # every node a prefix of its slots, so ``filled`` still marks them.
    x1, y1, x2, y2, area = table.unbind(1)
    mask = [(x1, inf), (x1, -inf), (y1, inf), (y1, -inf), (x2, inf), (x2, -inf), (y2, inf)]
    mask += [(y2, -inf), ((x2 - x1).clamp_(min=0), inf), ((y2 - y1).clamp_(min=0), inf)]
    mask += [(area, inf)]
    stats = torch.stack([torch.where(filled, v, pad) for v, pad in mask]).view(11, -1, _LEAF)
    low = torch.tensor([True, False] * 4 + [True] * 3)[:, None]  # [11, 1]: least, else greatest
    bound = torch.where(low, stats.amin(2), stats.amax(2))  # [11, leaves]
    bounds, splits = [bound], [(bound.new_empty(0), bound.new_empty(0))]
    for _ in range(max(top, 0)):
        pair = bound.view(11, -1, 2)
        child = bound
        bound = torch.where(low, pair.amin(2), pair.amax(2))
        axis = (bound[1:8:2] - bound[0:8:2]).argmax(0)  # [nodes]
        left = child[1:8:2, 0::2].gather(0, axis[None])[0]
        splits.append((axis, left.masked_fill_(child[0, 1::2] == inf, inf)))
        bounds.append(bound)
    return _Tree(
        bounds=bounds,
        splits=splits,
        leaves=table.view(-1, _LEAF, 5).permute(2, 1, 0).reshape(5 * _LEAF, -1).contiguous(),
        slot_of=slot_of,
        root=torch.tensor(offset) >> torch.tensor(height).clamp(min=0),
        height=torch.tensor(height),
    )


def _search_tree(
    tree: _Tree,
    query: Tensor,
    query_image: Tensor,
    own: Tensor | None,
    budget: int,
    key: _Key | None,
    best: Tensor | None = None,
) -> Tensor:
    """Each query box's largest IoU with a box of its image's tree, by branch and bound.

    First, each query is compared with the leaf where it would sit itself (following the
    splits): a good first best. Then all queries descend together from their image's root, as
    a list of (query, node) pairs: each pair's two children get ``_bound_block``'s bound, and a
    child whose bound does not exceed the query's best cannot raise it and is dropped; the
    leaves reached are compared box by box. Every IoU is computed as ``_iou_block`` computes it,
    and the bound is at least every IoU of the node's boxes: exact arithmetic bounds them, and a
    relative margin of 64 units in the last place covers the rounding of both (a few units at
    most), so the maxima are those of all pairs to the bit. With ``key``, a child is dropped
    unless its bound reaches the least IoU whose key may exceed the best's (``_Key.rise``): the
    best's key is then the maximum's.
    The pairs are processed ``budget // 16`` at a time: memory stays bounded.

    Args:
        tree: the boxes searched.
        query: ``float [Q, 5]`` planes (``x1, y1, x2, y2, area``).
        query_image: ``int64 [Q]``.
        own: ``int64 [Q]``, the box of the tree that is the query itself (left out), or -1.
        budget: bounds the pairs in flight.
        key: what is read of each maximum (``_Key``), or None: the exact maximum.
        best: ``float [Q]``, IoUs of each query known already (with boxes of the tree), or None.

    Returns:
        ``float [Q]``: 0 in an image without boxes (or ``best``).
    """
    best = query.new_zeros(query.shape[0]) if best is None else best.clone()
    height = tree.height.index_select(0, query_image)
    if query.shape[0] == 0 or int(tree.height.max()) < 0:
        return best
    query_t = query.T.contiguous()  # [5, Q]
    own_slot = None if own is None else torch.where(own >= 0, tree.slot_of[own.clamp(min=0)], -1)
    piece = max(1, budget // 16)
    margin = 1 + 64 * torch.finfo(query.dtype).eps
    inf = float("inf")

    def leaf_max(q: Tensor, leaf: Tensor) -> Tensor:
        box = _take(query_t, q)[:, None]  # [5, 1, E]
        iou = _iou_block(box, _take(tree.leaves, leaf).view(5, _LEAF, -1))  # [LEAF, E]
        if own_slot is not None:
            at = own_slot.index_select(0, q) - (leaf << _SHIFT)
            mine = (at >= 0) & (at < _LEAF)
            at = at.clamp_(0, _LEAF - 1)[None]
            iou.scatter_(0, at, torch.where(mine, 0, iou.gather(0, at)))
        return iou.amax(0)

    # Where each query would sit: the leaf reached by following the splits.
    root = tree.root.index_select(0, query_image)
    node = root.clone()
    for level in range(int(tree.height.max()), 0, -1):
        axis, threshold = tree.splits[level]
        at = node.clamp(max=axis.shape[0] - 1)
        side = query_t.gather(0, axis.index_select(0, at)[None])[0] > threshold.index_select(0, at)
        node = torch.where(height >= level, node * 2 + side, node)
    searched = (height >= 0).nonzero()[:, 0]
    for start in range(0, searched.shape[0], piece):
        q = searched[start : start + piece]
        best[q] = torch.maximum(best[q], leaf_max(q, node.index_select(0, q)))
    # A child is kept where its bound reaches ``need``: above the best, or where its key rises.
    rise = key.rise if key is not None else partial(torch.nextafter, other=best.new_tensor(inf))
    need = rise(best)
    stack = []
    for h in range(int(tree.height.max()) + 1):
        q = ((height == h) & (need < inf)).nonzero()[:, 0]
        if q.shape[0]:
            stack.append((h, q, root.index_select(0, q)))
    while stack:
        level, q, node = stack.pop()
        e = q.shape[0]
        if e > piece:
            stack.append((level, q[piece:], node[piece:]))
            stack.append((level, q[:piece], node[:piece]))
            continue
        if level == 0:
            best.scatter_reduce_(0, q, leaf_max(q, node), "amax")
            need[q] = rise(best.index_select(0, q))
            continue
        near = _take(tree.bounds[level - 1], torch.cat([node * 2, node * 2 + 1]))
        near = near.view(11, 2, e)
        bound = _bound_block(_take(query_t, q)[:, None], near).mul_(margin)  # [2, E]
        side, keep = (bound >= need.index_select(0, q)).nonzero().unbind(1)
        if keep.shape[0]:
            stack.append(
                (level - 1, q.index_select(0, keep), node.index_select(0, keep) * 2 + side)
            )
    return best


def _fixed_bin(overlap: Tensor, upper: float, num_bins: int) -> Tensor:
    """The soft strategy's fixed bin of each ``overlap: float [...]`` -> ``int64 [...]``."""
    return (overlap / (upper / num_bins)).floor().long().clamp(0, num_bins - 1)


@dataclass(frozen=True)
class _Key:
    """What ``_pick`` reads of an overlap: a monotone step function ``read`` to ``0 ..
    len(edges)``, and ``edges``, IoUs at or below each step's least IoU."""

    read: Callable[[Tensor], Tensor]
    edges: tuple[float, ...]

    def __call__(self, overlap: Tensor) -> Tensor:
        return self.read(overlap)

    def rise(self, overlap: Tensor) -> Tensor:
        """Below this, no IoU's key exceeds that of each ``overlap`` (infinite at the top)."""
        return overlap.new_tensor([*self.edges, float("inf")])[self.read(overlap)]


def _overlap_key(
    strategy: Strategy, *, bins: Bins, num_bins: int, upper: float, hard_thr: float
) -> _Key | None:
    """What ``_pick`` reads of the overlaps under ``strategy``, or None where it reads them all."""
    if strategy == "uniform":
        return _Key(partial(torch.zeros_like, dtype=torch.int64), ())
    if strategy == "hard":
        return _Key(lambda overlap: (overlap >= hard_thr).long(), (hard_thr,))
    if strategy == "soft" and bins == "fixed":
        # The division rounds: a hair below each edge, so that no IoU of a bin falls below it.
        edges = tuple(upper / num_bins * k * (1 - 1e-5) for k in range(1, num_bins))
        return _Key(partial(_fixed_bin, upper=upper, num_bins=num_bins), edges)
    return None


def _pick(
    strategy: Strategy,
    flat: FlatBatch,
    eligible: Tensor,
    overlap: Tensor,
    target: Tensor,
    *,
    num_bins: int,
    hard_thr: float,
    upper: float,
    bins: Bins,
    linear_top_up: bool,
    max_quota: int,
    generator: torch.Generator | None,
    uniform_here: Tensor | None = None,
) -> Tensor:
    """``target: [B]`` picks per image from ``eligible: [N]`` by ``overlap: [N]`` -> ``bool [N]``.

    See ``sample_overlap`` for the strategies and the top-up. ``uniform_here: bool [N]`` marks
    the candidates of images where the draw is uniform whatever the strategy (the negatives of an
    image without positives, whose IoU(p,n) are all 0).
    """
    nothing = torch.zeros_like(eligible)
    fill = partial(fill_shortfall, flat, max_quota=max_quota, generator=generator)
    if strategy == "hard":
        picked = fill(nothing, eligible & (overlap >= hard_thr), target)
    elif strategy == "soft" and bins == "observed":
        return _soft_observed(flat, eligible, overlap, target, num_bins, max_quota, generator)
    elif strategy == "soft":
        bin_index = _fixed_bin(overlap, upper, num_bins)
        quota = (target // num_bins)[:, None].expand(-1, num_bins)  # [B, K]
        group = torch.where(eligible, bin_index, -1)
        picked = draw(
            flat, None, group, quota, max_quota=max_quota // num_bins, generator=generator
        )
    elif strategy == "linear":
        picked = fill(nothing, eligible, target, weight=overlap)  # weight 0: never drawn
        if not linear_top_up:
            if uniform_here is None:
                return picked
            # Without positives there is no IoU(p,n) to weigh by: uniform, as the others are.
            return fill(picked, eligible & uniform_here, target)
    else:  # uniform: the top-up is the whole draw
        picked = nothing
    return fill(picked, eligible, target)


def _soft_observed(
    flat: FlatBatch,
    eligible: Tensor,
    overlap: Tensor,
    target: Tensor,
    num_bins: int,
    max_quota: int,
    generator: torch.Generator | None,
) -> Tensor:
    """The authors' ``OvSampler`` (``sampling-free``), for any ``num_bins`` K.

    Per image, the eligible candidates' observed overlap range ``[lo, hi]`` is cut into K equal
    bins at ``((K - k) * lo + k * hi) / K`` (K = 2: the midpoint ``(lo + hi) / 2``, as
    ``0.5 * (min + max)`` there); a value on an edge belongs to the lower bin (their
    ``iou <= split``). Each candidate weighs ``1 / N_k``, so every non-empty bin has the same total
    weight, and ``target`` are drawn without replacement with probability proportional to the
    weights, as their ``sampled_probs.multinomial(num_neg)`` draws.
    """
    b = flat.num_images
    lo = torch.full((b,), float("inf"), device=flat.device)
    lo = lo.scatter_reduce(0, flat.image, torch.where(eligible, overlap, float("inf")), "amin")
    hi = torch.full((b,), float("-inf"), device=flat.device)
    hi = hi.scatter_reduce(0, flat.image, torch.where(eligible, overlap, float("-inf")), "amax")
    lo, hi = flat.per_image(lo), flat.per_image(hi)  # [N]; infinite where nothing is eligible
    bin_index = torch.zeros_like(flat.image)
    for k in range(1, num_bins):
        bin_index += overlap > ((num_bins - k) * lo + k * hi) / num_bins
    segment = torch.where(eligible, flat.image * num_bins + bin_index, -1)  # [N]
    per_bin = count_per_segment(eligible, segment, b * num_bins)  # [B * K]
    weight = torch.where(eligible, 1.0 / per_bin[segment.clamp(min=0)].clamp(min=1), 0.0)
    group = torch.where(eligible, 0, -1)
    return draw(flat, weight, group, target[:, None], max_quota=max_quota, generator=generator)


def _best_matched(flat: FlatBatch, matched: Tensor) -> Tensor:
    """Each (image, ground truth)'s ``matched: bool [N]`` candidate of the largest ``max_iou``,
    ties to the lower index -> ``bool [N]``.

    On the CPU, where a host read is free, two scatters over the matched candidates (each ground
    truth's largest overlap, then the least index that holds it) take the place of the sorts of
    ``segment_by_key`` and ``take_top_in_segments``: the same picks.
    """
    if flat.device.type != "cpu":
        keys = torch.where(matched, flat.max_iou, float("-inf"))
        per_gt = segment_by_key(flat.image, flat.gt_index, matched)
        return take_top_in_segments(keys, per_gt, torch.ones_like(per_gt))
    n = matched.shape[0]
    index = matched.nonzero()[:, 0]  # [M]
    if index.shape[0] == 0:
        return torch.zeros_like(matched)
    gt = flat.gt_index.index_select(0, index)
    low, high = (int(v) for v in torch.aminmax(gt))
    span = high - low + 1
    segment = flat.image.index_select(0, index) * span + (gt - low)  # [M]: (image, ground truth)
    iou = flat.max_iou.index_select(0, index)
    top = iou.new_full((flat.num_images * span,), float("-inf"))
    top.scatter_reduce_(0, segment, iou, "amax")
    holds = iou == top.index_select(0, segment)
    first = torch.full_like(top, n, dtype=torch.int64)
    first.scatter_reduce_(0, segment, torch.where(holds, index, n), "amin")
    best = first.index_select(0, segment) == index
    return torch.zeros_like(matched).index_put_((index,), best)


def sample_overlap(
    boxes: Sequence[Tensor],
    assignments: Sequence[Assignment],
    *,
    num: int = OverlapSampler.num,
    pos_fraction: float = OverlapSampler.pos_fraction,
    strategy: Strategy = OverlapSampler.strategy,
    pos_strategy: Strategy = OverlapSampler.pos_strategy,
    num_bins: int = OverlapSampler.num_bins,
    hard_thr: float = OverlapSampler.hard_thr,
    upper: float = OverlapSampler.upper,
    bins: Bins = OverlapSampler.bins,
    linear_top_up: bool = OverlapSampler.linear_top_up,
    epsilon: float = OverlapSampler.epsilon,
    epsilon_on: EpsilonOn = OverlapSampler.epsilon_on,
    gt_copies_in_pe: bool = OverlapSampler.gt_copies_in_pe,
    gt_copies_in_pn: bool = OverlapSampler.gt_copies_in_pn,
    generator: torch.Generator | None = None,
) -> list[Selection]:
    """The Overlap Sampler (Chen et al., WACV 2020, Sec. 3.2): sample by IoU among the examples.

    Quotas per image are those of ``sample_random``, as the paper's baseline (Sec. 3.2: "sample
    512 proposals in an image ... positive and negative anchors have a ratio of up to 1:3"):
    ``int(num * pos_fraction)`` positives at most, negatives fill the rest of ``num``; ignored
    candidates are never picked. The defaults are the paper's best setting, Table 2(f): soft
    negatives with K = 2, soft positives, ε = 2 (its θ = 0.55 is the detector's inference NMS,
    see ``OverlapSampler``).

    **Ground-truth copies.** The model integration appends the ground truths to the proposals,
    as the paper's maskrcnn-benchmark does. A copy is recognised by its IoU of exactly 1 with its
    ground truth (a proposal identical to a ground truth is one in every way that matters here).

    **IoU(p,n)** of a negative is its largest IoU with any positive of the same image, the
    ground-truth copies included: the paper defines it over "positives (IoU(g,p) >= 0.5)" (Fig.
    4), which the copies are, and the authors' ``OvSampler`` takes the IoU with every positive
    proposal, copies included. ``gt_copies_in_pn=False`` offers the other reading, "positives"
    as positive *examples* (proposals) only, the copies left out as they are from IoU(p,e) by
    default: then a negative's IoU(p,n) is its largest IoU with a positive proposal, and an image
    whose only positives are copies counts as one without positives. In an image without
    positives every IoU(p,n) is 0, and every strategy is uniform (the authors' code: random when
    there is no positive).

    **IoU(p,e)** of a positive is "the overlap between positives and all examples" (Sec. 3.2):
    its largest IoU with any *other* proposal of the image (positive, negative or ignored),
    the ground-truth copies left out by default (``gt_copies_in_pe=False``). The paper's point is
    "the overlaps among examples themselves", as against "the overlaps between ground-truths and
    examples" that other samplers use (Sec. 1, Fig. 1); a positive's IoU with its ground truth's
    copy is the latter (at least 0.5 by definition), and counting it puts 98% of the positives in
    the top soft bin, so that soft and hard positive sampling reduce to uniform. The IoU
    interval [0, 0.7) of footnote 3 ("As the RPN uses the NMS of 0.7 thresholds, the IoU interval
    in the per-region stage is [0, 0.7)") also holds among proposals only. Ignored proposals
    stay in: they are among the detections that the inference NMS, the paper's motivation,
    compares. ``gt_copies_in_pe=True`` counts the copies too.

    **Strategies** (Sec. 3.2 and 4.2, "we use the same probability sampling methods" for
    positives):

    * ``uniform``: "completely the same as random sampling".
    * ``hard``: "sample all IoU(p,n) >= θ examples ... where θ is the NMS threshold", uniformly
      among them when they exceed the quota, then "a uniform probability sampling to sample the
      N - U negatives with IoU(p,n) < θ". ``hard_thr`` is θ (the paper's default NMS 0.5).
    * ``soft``: "evenly split the sampling interval into K bins according to IoU(p,n). Then,
      we select samples from them uniformly" (Eq. 2, p_i = N/K · 1/N_k); ``num_bins`` is K.
      ``bins="fixed"`` (default): the interval of footnote 3, K equal bins over ``[0, upper)``
      with ``upper`` 0.7, each with quota ``target // K``; an overlap >= ``upper`` (proposals of
      different pyramid levels escape the RPN's per-level NMS) counts in the top bin. The paper
      does not say what fills a bin's shortfall (or the remainder of ``target / K``); it is a
      uniform draw from the other candidates, as in IoU-balanced sampling's reference.
      ``bins="observed"``: the authors' ``OvSampler``, K equal bins over each image's observed
      ``[min, max]`` of the overlaps (K = 2: split at the midpoint, a value on it in the lower
      bin), every candidate weighted ``1 / N_k`` and ``target`` drawn without replacement in
      proportion (their ``multinomial``), so that a short bin's share passes to the others.
    * ``linear``: "the normalized IoU(p,n) as the sampled probability" (Eq. 3), a draw without
      replacement with weight = overlap. The paper: "this sampling method would not select the
      negatives with IoU(p,n) = 0", so by default (``linear_top_up=False``) zero-overlap
      candidates are never picked, and an image may get fewer than its quota (except in an
      image without positives, where every IoU(p,n) is 0 and the draw is uniform, as above).
      ``linear_top_up=True`` fills the shortfall uniformly from them.

    ``hard`` and fixed-bin ``soft`` fill any shortfall (too few hard ones, short bins) uniformly
    from the remaining eligible candidates, so their quota is met whenever enough candidates
    exist. **Positives** use ``pos_strategy`` on IoU(p,e) when they exceed their quota; otherwise
    all are taken, whatever the strategy ("it is common to sample all positives").

    **ε** (Sec. 3.2): "For each ground-truth, we find its best matched positive example, and
    multiple their weights by a factor ε during loss computing." After picking, in every image,
    each ground truth's picked positive proposal with the largest IoU with it (ties: the lower
    index) weighs ``epsilon``; every other pick weighs 1. With ``epsilon_on="best_proposal"``
    (default) the ground-truth copies are no candidates for it: the copy is not a matched
    *example* but the ground truth itself, and with it every ε lands on the copy (IoU 1), whose
    box loss is 0 (its regression target is 0), leaving only its classification loss reweighted.
    A ground truth none of whose proposals is picked gets no ε. ``epsilon_on="any_positive"``
    lets the copies win. ``epsilon=1`` disables it.

    Args:
        boxes: ``float [N_i, 4]`` candidates per image, in the assignments' order.
        assignments: one per image.
        num: candidates per image.
        pos_fraction: at most this fraction positive.
        strategy: how negatives are drawn by IoU(p,n).
        pos_strategy: how positives are drawn by IoU(p,e) when they exceed their quota.
        num_bins: K for ``soft``.
        hard_thr: θ for ``hard``.
        upper: top of the fixed ``soft`` bins.
        bins: ``"fixed"`` (the paper's ``[0, upper)``) or ``"observed"`` (the authors' code).
        linear_top_up: let ``linear`` fill its shortfall with zero-overlap candidates.
        epsilon: loss weight of each ground truth's best-matched picked positive.
        epsilon_on: ``"best_proposal"`` (ground-truth copies excluded) or ``"any_positive"``.
        gt_copies_in_pe: count the ground-truth copies in IoU(p,e).
        gt_copies_in_pn: count the ground-truth copies among the positives of IoU(p,n).
        generator: makes the picks reproducible.

    Returns:
        One ``Selection`` per image; weight 1 on the picks, ``epsilon`` on the best-matched ones.

    Raises:
        ValueError: on non-finite boxes or ``max_iou``, mismatched sizes, or bad settings.

    Example:
        A positive proposal (IoU 0.91 with the ground truth), a negative overlapping it by
        IoU 0.37, two far ones and the ground truth's copy. Both positives are taken; two
        negatives, one per soft bin ([0, 0.35) and [0.35, 0.7)), so the overlapping one always
        and one of the far ones; the positive proposal, not the copy, weighs ε = 2.

        >>> import torch
        >>> from hardmine.sample.overlap import sample_overlap
        >>> from hardmine import assign_max_iou
        >>> gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
        >>> boxes = [[0, 0, 10, 11], [0, 0, 10, 30], [20, 20, 30, 30], [40, 40, 50, 50]]
        >>> boxes = torch.tensor(boxes, dtype=torch.float32)
        >>> boxes = torch.cat([boxes, gt])  # the copy, as the model integration appends it
        >>> (a,) = assign_max_iou([boxes], [gt], [torch.tensor([1])])
        >>> a.label.tolist()
        [1, 0, 0, 0, 1]
        >>> (s,) = sample_overlap([boxes], [a], num=4, pos_fraction=0.5)
        >>> s.mask[[0, 1, 4]].tolist(), int(s.mask[2:4].sum()), s.weight[[0, 1, 4]].tolist()
        ([True, True, True], 1, [2.0, 1.0, 1.0])
    """
    check_overlap_settings(
        num=num,
        pos_fraction=pos_fraction,
        strategy=strategy,
        pos_strategy=pos_strategy,
        num_bins=num_bins,
        hard_thr=hard_thr,
        upper=upper,
        bins=bins,
        linear_top_up=linear_top_up,
        epsilon=epsilon,
        epsilon_on=epsilon_on,
        gt_copies_in_pe=gt_copies_in_pe,
        gt_copies_in_pn=gt_copies_in_pn,
    )
    flat = flatten(assignments)
    flat_boxes = flat.cat(boxes, "boxes")
    flat.check(check_boxes, flat_boxes, "boxes")
    flat.check(check_finite, flat.max_iou, "max_iou")
    pos, neg = flat.label == POSITIVE, flat.label == NEGATIVE
    gt_copy = flat.max_iou >= 1  # positive, or ignored where an ignore region covers it
    pn_pos = pos if gt_copies_in_pn else pos & ~gt_copy  # the positives of IoU(p,n)
    num_pos = flat.count(pos).clamp(max=int(num * pos_fraction))  # [B]
    num_neg = flat.count(neg).minimum(num - num_pos)  # [B]
    # Uniform strategies never look at the overlaps: skip what neither side needs.
    if strategy == "uniform" and pos_strategy == "uniform":
        iou_pn = iou_pe = torch.zeros_like(upcast(flat.max_iou))
    else:
        # IoU(p,e) only matters where an image has more positives than its quota ("it is common
        # to sample all positives"); overlap_with_positives synchronises with the host anyway.
        over_quota = bool((flat.count(pos) > int(num * pos_fraction)).any())
        # Only what _pick reads of each maximum, where that is less than its value.
        key = partial(_overlap_key, bins=bins, num_bins=num_bins, upper=upper, hard_thr=hard_thr)
        iou_pn, iou_pe = _overlaps(
            flat_boxes,
            flat,
            pos,
            with_pe=pos_strategy != "uniform" and over_quota,
            examples=None if gt_copies_in_pe else ~gt_copy,
            pn_key=key(strategy),
            pe_key=key(pos_strategy),
            pn_read=neg,
        )
        if not gt_copies_in_pn and strategy != "uniform":
            iou_pn, _ = _overlaps(
                flat_boxes, flat, pn_pos, with_pe=False, pn_key=key(strategy), pn_read=neg
            )
    pick = partial(
        _pick,
        num_bins=num_bins,
        hard_thr=hard_thr,
        upper=upper,
        bins=bins,
        linear_top_up=linear_top_up,
        generator=generator,
    )
    pos_mask = pick(pos_strategy, flat, pos, iou_pe, num_pos, max_quota=int(num * pos_fraction))
    no_positives = flat.per_image(flat.count(pn_pos) == 0)  # [N]: IoU(p,n) all 0 there
    neg_mask = pick(strategy, flat, neg, iou_pn, num_neg, max_quota=num, uniform_here=no_positives)
    mask = pos_mask | neg_mask
    weight = mask.to(upcast(flat.max_iou).dtype)
    if epsilon != 1.0:
        matched = pos_mask if epsilon_on == "any_positive" else pos_mask & ~gt_copy
        weight = torch.where(_best_matched(flat, matched), epsilon, weight)
    return flat.split(mask, weight)
