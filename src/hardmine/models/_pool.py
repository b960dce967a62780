"""Multi-scale RoI-align spread over the CPU's threads, for OHEM's read-only pass.

torchvision's CPU ``roi_align`` kernel runs on one thread, whatever ``torch.get_num_threads()``
says; OHEM's read-only pass pools every proposal (2000 RoIs per image) and that single thread was
its largest cost on a CPU. ``pool_flat`` gives each thread a share of every level's RoIs. The
values are torchvision's own: every RoI is pooled by the same ``roi_align`` call on the same
feature map, only in another thread (tested bitwise).

It spreads only outside autograd. With gradients, each share's backward would allocate and
accumulate a gradient of the whole feature map (82 MB per share at P2 of two 800 px images), in
the one thread the autograd engine gives it: more than the threads save on the few hundred RoIs
of a training pass. There, and for a pooler that is not torchvision's ``MultiScaleRoIAlign``
(or hardmine's ``GatherMultiScaleRoIAlign``, whose values are the same), it calls the pooler as it
is. On CUDA or with one thread it pools level by level in the calling
thread, still in raster order.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor, nn
from torchvision.ops import MultiScaleRoIAlign, roi_align

from hardmine.models._roi_align import GatherMultiScaleRoIAlign

# Below this many RoIs per thread, handing work to other threads costs more than it saves.
_MIN_ROIS_PER_THREAD = 32
# Rows of the image per band of the raster order the RoIs are pooled in (measured: 16-128 pixels
# all about halve the time of 4000 R-50-FPN RoIs; 64 a little the best).
_BAND = 64

_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _threads(width: int) -> ThreadPoolExecutor:
    """One process-wide pool of ``width`` threads (replaced if the width changes)."""
    global _executor
    with _executor_lock:
        if _executor is None or _executor._max_workers != width:
            if _executor is not None:
                _executor.shutdown(wait=False)
            _executor = ThreadPoolExecutor(width, thread_name_prefix="hardmine-roi-align")
        return _executor


def pool_flat(
    pool: nn.Module,
    features: dict[str, Tensor],
    rois: Tensor,
    image_shapes: list[tuple[int, int]],
    *,
    buffer: Tensor | None = None,
) -> Tensor:
    """``pool(features, boxes, image_shapes)`` of RoIs given as rows ``(image, x1, y1, x2, y2)``.

    Args:
        pool: the heads' RoI pooler (``box_roi_pool``).
        features: feature maps by name, ``[B, C, H, W]`` each.
        rois: ``[R, 5]``, boxes xyxy in the transformed image's pixels, images in any order.
        image_shapes: per image, ``(H, W)`` after the transform.
        buffer: a tensor of at least ``R`` rows of the output's shape to write into, so that a
            loop over slices of RoIs reuses one block of memory.

    Returns:
        ``[R, C, h, w]`` in ``rois``' order, equal to ``pool``'s output.
    """
    parts = pool_parts(pool, features, rois, image_shapes)
    if len(parts) == 1 and parts[0][0] is None:
        return parts[0][1]
    shape = (rois.shape[0], *parts[0][1].shape[1:])
    if buffer is not None and buffer.shape[0] >= shape[0] and buffer.shape[1:] == shape[1:]:
        out = buffer[: shape[0]]
    else:
        out = parts[0][1].new_empty(shape)
    # Every row is written below (each RoI is in one part): no need to zero it first.
    for index, pooled in parts:
        out.index_copy_(0, index, pooled)
    return out


def pool_parts(
    pool: nn.Module,
    features: dict[str, Tensor],
    rois: Tensor,
    image_shapes: list[tuple[int, int]],
) -> list[tuple[Tensor | None, Tensor]]:
    """``pool_flat``'s output in parts, as the pooling produced them, without assembling them.

    Returns:
        ``(index, pooled)`` pairs: ``pooled: [r, C, h, w]`` holds the RoIs ``rois[index]``; every
        RoI is in exactly one part. ``index`` is None for a single part in ``rois``' order (the
        pooler's own interface: with gradients, or a pooler that is not torchvision's).
        A caller that reduces each RoI to a few numbers (OHEM's losses) spares itself the copy
        of every pooled feature into one tensor.
    """
    if type(pool) not in (MultiScaleRoIAlign, GatherMultiScaleRoIAlign) or torch.is_grad_enabled():
        # Through the pooler's own interface (see the module docstring for autograd).
        boxes = [rois[rois[:, 0] == i, 1:] for i in range(len(image_shapes))]
        order = torch.argsort(rois[:, 0], stable=True)  # pool's output is in image order
        out = pool(features, boxes, image_shapes)
        return [(None, out.index_select(0, torch.argsort(order)))]
    if pool.scales is None or pool.map_levels is None:
        empty = [rois.new_zeros((0, 4)) for _ in image_shapes]
        pool(features, empty, image_shapes)  # torchvision sets scales and levels on first use
    # The maps the pooler uses: those of its names that ``features`` has, in ``features``' order,
    # as torchvision's ``_filter_input`` takes them (MobileNetV3's FPN gives "0", "1", "pool"
    # to a pooler of "0" to "3").
    maps = [f for name, f in features.items() if name in pool.featmap_names]
    total = rois.shape[0]
    if len(maps) > 1:
        levels = pool.map_levels([rois[:, 1:]])
    else:
        levels = rois.new_zeros(total, dtype=torch.int64)
    width = torch.get_num_threads()
    threaded = width > 1 and total >= 2 * _MIN_ROIS_PER_THREAD and maps[0].device.type == "cpu"
    chunks = max(1, min(width, total // _MIN_ROIS_PER_THREAD)) if threaded else 1

    def align(feature: Tensor, part: Tensor, scale: float) -> Tensor:
        with torch.no_grad():  # grad mode is per thread
            if feature.dtype == part.dtype:
                return roi_align(feature, part, pool.output_size, scale, pool.sampling_ratio)
            # Half-precision features (autocast) with float32 RoIs: what torchvision's autocast
            # rule for roi_align does, pooling in float32 and returning the features' type.
            # Autocast is per thread, so the workers would not apply it themselves.
            out = roi_align(
                feature.float(), part.float(), pool.output_size, scale, pool.sampling_ratio
            )
            return out.to(feature.dtype)

    # Every job's inputs are cut before the first starts, so the main thread does not compete
    # with the workers for the cores. Each job pools its RoIs in raster order (image, band of
    # rows, x): RoIs near each other read the same cache lines of the feature map, which halves
    # the kernel's time against the proposals' own (score) order. No per-image split: one
    # selection per level, as in torchvision's pooler (on CUDA, its only host syncs).
    order = raster_order(rois)
    tasks = []
    for level, (feature, scale) in enumerate(zip(maps, pool.scales, strict=True)):
        index = order[levels[order] == level]
        for part in index.tensor_split(chunks):
            if part.numel():
                tasks.append((part, feature, rois[part], scale))
    if not tasks:  # no RoIs: one empty part of the output's shape
        empty = maps[0].new_empty((0, maps[0].shape[1], *pool.output_size))
        return [(rois.new_zeros(0, dtype=torch.int64), empty)]
    if threaded:
        executor = _threads(width)
        futures = [executor.submit(align, f, r, scale) for _, f, r, scale in tasks]
        results = [future.result() for future in futures]
    else:
        results = [align(f, r, scale) for _, f, r, scale in tasks]
    return [(part, result) for (part, *_), result in zip(tasks, results, strict=True)]


def raster_order(rois: Tensor) -> Tensor:
    """Indices that sort ``rois: [R, 5]`` by image, band of ``_BAND`` pixel rows, then x (centres).

    RoIs near each other in this order read the same cache lines of a feature map.
    """
    limit = 2**20 - 1  # pixels; the fields below are 20 bits each
    cx = ((rois[:, 1] + rois[:, 3]) / 2).clamp(0, limit).long()
    band = ((rois[:, 2] + rois[:, 4]) / (2 * _BAND)).clamp(0, limit).long()
    return torch.argsort((rois[:, 0].long() << 40) | (band << 20) | cx)
