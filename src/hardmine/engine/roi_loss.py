"""The loss of every RoI, not only the picked ones: OHEM's sampler-independent training measure.

Shrivastava et al. (CVPR 2016, Sec. 5.5, Fig. 3): "It's important to measure training loss in a
way that does not depend on the sampling procedure and thus results in a valid comparison
between methods. To achieve this goal, we take model snapshots from each method ... and run them
over the entire VOC07 trainval set to compute the average loss over all RoIs." A sampler that
trains only on easy examples lowers its own loss but not this one.

The same RoIs, labelled the same way, for every run, whatever its sampler and assigner:

* the RoIs are every proposal of the run's RPN in its training setting, with the ground-truth
  boxes appended (the candidates the samplers choose from in training), of the first
  ``max_images`` training images (``train.roi_loss_images`` in a run);
* each is labelled by ``ALL_ROIS_ASSIGNER``, max-IoU with the paper's foreground rule (IoU >= 0.5,
  Sec. 3.1) and every other RoI background: bg_lo = 0, as OHEM has it, so no RoI is ignored, and
  a run whose own assigner ignores some (Fast R-CNN's bg_lo = 0.1) is still measured on all;
* each RoI's loss is the classification log loss plus the smooth-L1 box loss of foreground
  RoIs of the run's RoI heads, as OHEM's read-only pass computes it, but with settings fixed
  for every run, so that a run's own training settings do not change the measure: the box loss
  with torchvision's beta (``ALL_ROIS_BOX_BETA`` = 1/9) whatever the run's
  ``model.box_loss_beta``, and everything (RPN and heads) in float32, outside any autocast,
  whatever its ``model.score_dtype`` or ``train.amp``.

What it does NOT hold fixed, which a Faster R-CNN cannot avoid: the RoI set. The paper's Fast
R-CNN reads fixed selective-search proposals; each run here has its own RPN, trained with it, so
its proposals differ from another run's (the images, the labelling rule and the loss do not).
The measure is therefore "the mean loss of this run's heads over this run's own RPN proposals
plus the ground truths", comparable between runs as the paper's is only to that extent.

The pass is read-only (``hardmine.models.read_only``): no gradient, the detector in eval mode
(normalisation layers use their running statistics, so the measure does not depend on the batch).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hardmine.assign import MaxIoUAssigner
from hardmine.data import collate_fn
from hardmine.models._losses import TORCHVISION_BOX_BETA
from hardmine.models.read_only import rcnn_heads, roi_batch, roi_losses

#: The labelling of "all RoIs", the same for every run: foreground at IoU >= 0.5 with a ground
#: truth, background below (bg_lo = 0), nothing ignored.
ALL_ROIS_ASSIGNER = MaxIoUAssigner(pos_thr=0.5, neg_thr=0.5, low_quality=False)

#: The smooth-L1 beta of the measure, the same for every run: torchvision's (1/9), whatever
#: beta a run trains with (``model.box_loss_beta``).
ALL_ROIS_BOX_BETA = TORCHVISION_BOX_BETA


def mean_loss_all_rois(
    model: nn.Module,
    data: Dataset | DataLoader,
    *,
    device: torch.device | str,
    max_images: int | None = None,
    batch_size: int = 4,
) -> float | None:
    """Mean loss per RoI over all RoIs of ``data`` (Shrivastava et al., CVPR 2016, Fig. 3).

    All RoIs: the RPN's training proposals plus the ground truths, every one, labelled by
    ``ALL_ROIS_ASSIGNER`` whatever the run's own assigner; the loss with beta
    ``ALL_ROIS_BOX_BETA`` and in float32, whatever the run's own settings (see the module
    docstring; the proposals are the run's own).

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
    count = 0
    seen = 0
    # Float32 for every run: no autocast (train.amp), no half-precision box head (score_dtype).
    with torch.autocast(torch.device(device).type, enabled=False):
        for images, targets in loader:
            take = len(images) if max_images is None else min(len(images), max_images - seen)
            if take <= 0:
                break
            batch = roi_batch(
                model,
                [i.to(device) for i in images[:take]],
                [{k: t[k].to(device) for k in ("boxes", "labels")} for t in targets[:take]],
                assigner=ALL_ROIS_ASSIGNER,
            )
            losses = torch.cat(
                roi_losses(model, batch, score_dtype=None, box_loss_beta=ALL_ROIS_BOX_BETA)
            )
            total += losses.sum()
            count += losses.numel()
            seen += take
    return float(total / count) if count else float("nan")
