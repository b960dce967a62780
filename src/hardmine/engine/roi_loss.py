"""The loss of every RoI, not only the picked ones: OHEM's sampler-independent training measure.

Shrivastava et al. (CVPR 2016, Sec. 5.5, Fig. 3) compare sampling methods by the mean loss per RoI
over *all* RoIs of the training set: a sampler that trains only on easy examples lowers its own
loss but not this one. Every RoI means every proposal of the RPN in its training setting, with the
ground-truth boxes appended, exactly the candidates the samplers choose from during training.

The pass is read-only (``hardmine.models.read_only``): no gradient, the detector in eval mode
(normalisation layers use their running statistics, so the measure does not depend on the batch).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hardmine.data import collate_fn
from hardmine.models.read_only import rcnn_heads, roi_batch, roi_losses
from hardmine.structures import IGNORE


def mean_loss_all_rois(
    model: nn.Module,
    data: Dataset | DataLoader,
    *,
    device: torch.device | str,
    max_images: int | None = None,
    batch_size: int = 4,
) -> float | None:
    """Mean loss per RoI over all RoIs of ``data`` (Shrivastava et al., CVPR 2016, Fig. 3).

    All RoIs: the RPN's training proposals plus the ground truths, every one the assigner does not
    ignore, whichever a sampler would pick. Each RoI's loss is OHEM's: softmax log loss plus the
    smooth-L1 box loss of foreground RoIs.

    Args:
        model: the detector, unwrapped from DDP, on ``device``; its mode is restored afterwards.
        data: the training set, or a loader of ``(images, targets)`` batches from it.
        device: where ``model`` is.
        max_images: only the first this many images.
        batch_size: images per forward pass when ``data`` is a dataset.

    Returns:
        The mean, NaN when there are no RoIs; None for a detector without RoI heads.
    """
    if rcnn_heads(model) is None:
        return None
    loader = (
        data
        if isinstance(data, DataLoader)
        else DataLoader(data, batch_size=batch_size, collate_fn=collate_fn)
    )
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    for images, targets in loader:
        take = len(images) if max_images is None else min(len(images), max_images - seen)
        if take <= 0:
            break
        batch = roi_batch(
            model,
            [i.to(device) for i in images[:take]],
            [{k: t[k].to(device) for k in ("boxes", "labels")} for t in targets[:take]],
        )
        # A measurement: in the model's own precision, whatever OHEM's scoring uses.
        losses = torch.cat(roi_losses(model, batch, score_dtype=None))
        counted = torch.cat([a.label for a in batch.assignments]) != IGNORE
        total += losses[counted].sum()
        count += counted.sum()
        seen += take
    return float(total / count) if int(count) else float("nan")
