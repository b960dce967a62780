"""A batch of candidates and ground truths, checked and padded for the ``[B, G, N]`` assigners."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hardmine._host import host_tensor
from hardmine.boxes import check_boxes, check_magnitude, coordinate_limit, iof_matrix, upcast
from hardmine.structures import POSITIVE, Assignment

#: Ground truths per chunk of the ``[B, G, N]`` matrices. With 100k candidates a chunk's IoU
#: matrix is 25 MB per image (float32); typical images (COCO: about 7 ground truths) fit in one.
DEFAULT_CHUNK_SIZE = 64

#: Elements of one block's ``[b, C, N]`` matrices on the CPU (2 MB of float32). There the assigners
#: are bound by memory traffic, not arithmetic: small matrices stay in the caches and reuse freed
#: memory, where a whole batch's (28 MB for 16 images of 22k anchors and 20 ground truths) faults
#: in fresh pages at every step and runs several times slower per image. Measured on ATSS, 2**18
#: to 2**20 perform alike. Other devices take the whole batch in one block.
CPU_BLOCK_ELEMENTS = 2**19


@dataclass(frozen=True)
class Batch:
    """A batch of images' candidates and ground truths, zero-padded to common sizes.

    Attributes:
        candidates: ``float [B, N, 4]``, ``N`` the largest candidate count, in the candidates'
            dtype or ``float32`` for half-precision ones (see ``prepare_batch``).
        gt_boxes: ``[B, G, 4]`` in the same dtype, ``G`` the largest ground-truth count
            (at least 1, so that images without ground truth need no special path). Padding is
            zero-area at the origin: its IoU with every candidate is 0, so it never beats a real
            ground truth (they come first, and ties go to the first).
        gt_labels: ``int64 [B, G]``.
        gt_valid: ``bool [B, G]``: false on padding.
        ignored: ``bool [B, N]``: candidates inside an ignore region; ``None`` without ignore
            regions, which spares the assigners its masking.
        num_candidates: candidates per image (host ints, known from the shapes: no sync).
        num_gt: ground truths per image (host ints).
    """

    candidates: Tensor
    gt_boxes: Tensor
    gt_labels: Tensor
    gt_valid: Tensor
    ignored: Tensor | None
    num_candidates: list[int]
    num_gt: list[int]

    @property
    def has_gt(self) -> Tensor:
        """``bool [B, 1]``: which images have any ground truth."""
        return self.gt_valid.any(dim=1, keepdim=True)

    def blocks(self, chunk_size: int, max_elements: int | None = None) -> list[tuple[Batch, int]]:
        """Consecutive groups of images, each padded only to its own largest ``N`` and ``G``, with
        the ground truths per chunk to use on each.

        On the CPU a block's ``[b, C, N]`` matrices hold at most ``max_elements`` (default
        ``CPU_BLOCK_ELEMENTS``) where possible: ``C`` is ``chunk_size`` or smaller, and ``b`` as
        many images as fit (at least one). Elsewhere the batch is one block with ``chunk_size``.
        """
        if self.candidates.device.type != "cpu":
            return [(self, chunk_size)]
        limit = CPU_BLOCK_ELEMENTS if max_elements is None else max_elements
        blocks, start = [], 0
        while start < len(self.num_candidates):
            stop, n, g = start + 1, self.num_candidates[start], self.num_gt[start]
            while stop < len(self.num_candidates):
                n2, g2 = max(n, self.num_candidates[stop]), max(g, self.num_gt[stop])
                if (stop + 1 - start) * n2 * min(max(g2, 1), chunk_size) > limit:
                    break
                stop, n, g = stop + 1, n2, g2
            chunk = max(1, min(chunk_size, limit // max(n, 1)))
            blocks.append((self._slice(start, stop, n, max(g, 1)), chunk))
            start = stop
        return blocks

    def _slice(self, start: int, stop: int, n: int, g: int) -> Batch:
        """Images ``start:stop``, trimmed to ``n`` candidates and ``g`` ground truths."""
        whole = (start, stop) == (0, len(self.num_candidates))
        if whole and (n, g) == (self.candidates.shape[1], self.gt_boxes.shape[1]):
            return self  # one block of the whole batch (two images, say): no views to make
        return Batch(
            candidates=self.candidates[start:stop, :n],
            gt_boxes=self.gt_boxes[start:stop, :g],
            gt_labels=self.gt_labels[start:stop, :g],
            gt_valid=self.gt_valid[start:stop, :g],
            ignored=None if self.ignored is None else self.ignored[start:stop, :n],
            num_candidates=self.num_candidates[start:stop],
            num_gt=self.num_gt[start:stop],
        )

    def split(self, label: Tensor, gt_index: Tensor, max_iou: Tensor) -> list[Assignment]:
        """Cut padded ``[B, N]`` results back into one ``Assignment`` per image.

        ``gt_class`` is looked up from ``gt_index`` where the label is positive.
        """
        gt_class = self.gt_labels.gather(1, gt_index).masked_fill_(label != POSITIVE, 0)  # [B, N]
        # One unbind per field, and a slice only where an image is shorter than the padding:
        # indexing [b, :n] is two ops per field and image, a cost that shows with many images.
        width = label.shape[1]
        fields = [t.unbind(0) for t in (label, gt_index, max_iou, gt_class)]
        return [
            Assignment(*(f[b] if n == width else f[b][:n] for f in fields))
            for b, n in enumerate(self.num_candidates)
        ]


def best_of_chunk(iou: Tensor) -> tuple[Tensor, Tensor]:
    """Each candidate's highest IoU over a chunk of ground truths, and the first that has it.

    ``iou: float [B, C, N]`` in ``[0, 1]`` -> ``(value [B, N], index int64 [B, N])``: what
    ``iou.max(dim=1)`` gives (the first maximum on ties), at less than half its cost on a CPU,
    where ``max`` with indices over a middle dimension takes as long as the whole IoU matrix.
    ``iou`` is overwritten (no matrix-sized allocation: fresh memory is slow on a CPU). The maxima
    are found by fast float passes: ``floor(iou - max)`` is 0 exactly where ``iou`` equals the
    maximum (IEEE subtraction is exact at 0) and -1 elsewhere; subtracting ``g / 2^k`` (exact in
    binary) and taking the maximum gives the first such ``g``.
    """
    value = iou.amax(dim=1, keepdim=True)  # [B, 1, N]
    chunk = iou.shape[1]
    scale = 1 << max(chunk - 1, 1).bit_length()  # a power of two > every index
    step = torch.arange(chunk, device=iou.device, dtype=iou.dtype)[:, None] / scale  # [C, 1]
    key = iou.sub_(value).floor_().sub_(step)  # [B, C, N]: > -1 exactly at the maxima
    index = key.amax(dim=1).mul_(-scale).long()
    return value.squeeze(1), index


def _check_box_batch(boxes: Sequence[Tensor], name: str) -> None:
    """``check_boxes`` on every image but for finiteness (see ``_check_finite``)."""
    for i, b in enumerate(boxes):
        # An empty slice checks type, shape and dtype without a per-image sync.
        check_boxes(b[:0] if isinstance(b, Tensor) and b.dim() else b, f"{name}[{i}]")


def _check_finite(boxes: Sequence[Tensor], padded: Tensor, name: str) -> None:
    """Raise ``NonFiniteError`` (a ``ValueError``) naming the first image with NaN, infinity or
    coordinates whose geometry would overflow (``check_boxes``).

    One host sync for the batch, on the largest absolute value of ``padded`` (the boxes,
    zero-padded; ``amax`` propagates NaN); only a batch that fails is checked image by image.
    """
    if not padded.numel():
        return
    # math.isfinite on the host: torch.isfinite on a scalar tensor is four small kernels.
    largest = float(padded.abs().amax())
    if not math.isfinite(largest) or largest > coordinate_limit(padded.dtype):
        for i, b in enumerate(boxes):
            if b.numel():  # against the limit of the type the geometry is computed in
                check_magnitude(float(b.detach().abs().amax()), padded.dtype, f"{name}[{i}]")


def _pad(tensors: Sequence[Tensor], length: int, like: Tensor) -> Tensor:
    """Zero-pad ``[n_i, ...]`` tensors to ``[B, length, ...]`` in ``like``'s dtype and device.

    Images that share one tensor (the anchors, usually) share it here too: a broadcast view, no
    copy.
    """
    if all(t is tensors[0] for t in tensors) and tensors[0].shape[0] == length:
        return tensors[0].to(like)[None].expand(len(tensors), *tensors[0].shape)
    if all(t.shape[0] == length for t in tensors):
        return torch.stack(list(tensors)).to(like)  # one copy instead of one per image
    out = like.new_zeros((len(tensors), length, *like.shape[1:]))
    for b, t in enumerate(tensors):
        out[b, : t.shape[0]] = t
    return out


def prepare_batch(
    candidates: Sequence[Tensor],
    gt_boxes: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    ignore_boxes: Sequence[Tensor] | None,
    ignore_iof_thr: float,
) -> Batch:
    """Validate one batch of assigner input and pad it (shared by the max-IoU and ATSS assigners).

    Args:
        candidates: per image ``float [N_i, 4]``.
        gt_boxes: per image ``float [G_i, 4]``.
        gt_labels: per image ``int [G_i]``.
        ignore_boxes: per image ``float [K_i, 4]``, or ``None``.
        ignore_iof_thr: a candidate is ignored where the fraction of it covered by an ignore box
            exceeds this.

    Returns:
        The padded batch, its boxes in the candidates' dtype, at least ``float32``.

    Raises:
        ValueError: on mismatched lengths or shapes, non-finite or overflowing boxes (see
            ``hardmine.boxes.check_boxes``), non-integer labels or labels below 1, or a threshold
            outside ``[0, 1]``; naming the argument and image.
    """
    num_images = len(candidates)
    if len(gt_boxes) != num_images or len(gt_labels) != num_images:
        raise ValueError(
            f"expected one entry per image: {num_images} candidates, {len(gt_boxes)} gt_boxes, "
            f"{len(gt_labels)} gt_labels"
        )
    if ignore_boxes is not None and len(ignore_boxes) != num_images:
        raise ValueError(f"ignore_boxes: expected {num_images} entries, got {len(ignore_boxes)}")
    if not 0.0 <= ignore_iof_thr <= 1.0:
        raise ValueError(f"ignore_iof_thr must lie in [0, 1], got {ignore_iof_thr}")
    _check_box_batch(candidates, "candidates")
    _check_box_batch(gt_boxes, "gt_boxes")
    for i, (boxes, labels) in enumerate(zip(gt_boxes, gt_labels, strict=True)):
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point():
            raise ValueError(f"gt_labels[{i}]: expected an integer tensor of shape [G]")
        if labels.shape[0] != boxes.shape[0]:
            raise ValueError(
                f"gt_labels[{i}]: {labels.shape[0]} labels for {boxes.shape[0]} gt_boxes"
            )

    # Padded in float32 (or the input's higher precision): under autocast the anchors come in
    # float16 while the ground truths stay float32, and one shared half type would round the
    # ground truths (to 1 px above 1024 px in float16) and change every IoU with them.
    like = upcast(candidates[0][:0])
    num_candidates = [c.shape[0] for c in candidates]
    num_gt = [g.shape[0] for g in gt_boxes]
    cand = _pad(candidates, max(num_candidates), like)  # [B, N, 4]
    _check_finite(candidates, cand[:1] if cand.stride(0) == 0 else cand, "candidates")
    gts = _pad(gt_boxes, max(max(num_gt), 1), like)  # [B, G, 4]
    _check_finite(gt_boxes, gts, "gt_boxes")
    labels = _pad(gt_labels, gts.shape[1], like.new_zeros(1, dtype=torch.int64))  # [B, G]
    counts = host_tensor(num_gt, like.device, torch.int64)
    gt_valid = torch.arange(gts.shape[1], device=like.device) < counts[:, None]  # [B, G]
    bad_label = (labels < 1) & gt_valid  # 0 is the background's class: no ground truth has it
    if bool(bad_label.any()):
        image = int(bad_label.any(dim=1).nonzero()[0])
        value = int(labels[image][bad_label[image]][0])
        raise ValueError(
            f"gt_labels[{image}]: expected object classes >= 1 (0 is the background), got {value}"
        )

    ignored = None
    if ignore_boxes is not None:
        _check_box_batch(ignore_boxes, "ignore_boxes")
        # Zero-area padding covers nothing, so it never ignores a candidate.
        ign = _pad(ignore_boxes, max(max(b.shape[0] for b in ignore_boxes), 1), like)
        _check_finite(ignore_boxes, ign, "ignore_boxes")
        ignored = iof_matrix(cand, ign).amax(dim=2) > ignore_iof_thr  # [B, N]
    return Batch(cand, gts, labels, gt_valid, ignored, num_candidates, num_gt)
