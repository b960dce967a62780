"""``hardmine inspect``: see what each sampler picks on the same RoIs.

For a batch of images the detector gives the RoIs as its RoI heads see them in training
(``hardmine.models.read_only.roi_batch``: the RPN's training proposals plus the ground truths,
max-IoU assignment with the heads' thresholds, torchvision's 0.5 / 0.5), every RoI's loss from the
read-only OHEM pass, and then every sampler picks from the same RoIs with the same seed. Written to
the output folder:

- ``overview.png``: where each sampler's picked negatives lie, one row per image, one column per
  sampler: random's share of negatives covering each pixel, and for every other sampler the
  difference to random's (``report.draw.where_sheet``), with the look-alikes of the built-in
  scenes dashed;
- ``overlaps.png``: each sampler's picked negatives that overlap a positive much (IoU(p,n) >=
  0.35), coloured by IoU(p,n) (``report.draw.overlap_sheet``);
- ``panels/image<k>_<sampler>.png``: every pick of one sampler on one image (``report.draw``);
- ``iou_histograms.png`` / ``.csv``: the picked negatives' IoU with the ground truth and with the
  positives, over more images (``report.picks``).

Panels of an earlier call to the same folder that this one did not draw (other samplers, more
images) are removed, so the folder shows one call's pictures.

An untrained detector's RPN proposes nearly random boxes, so without a trained run the proposals
are made by jittering the ground truths instead (``jitter_proposals``); the RoI losses then still
come from the (untrained) detector.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision.ops import box_iou, clip_boxes_to_image, nms

from hardmine._atomic import check_writable
from hardmine.data import CocoDataset, SceneDataset, make_scenes
from hardmine.engine.progress import progress
from hardmine.engine.rundir import load_run
from hardmine.errors import ConfigError
from hardmine.models.read_only import rcnn_heads, roi_batch, roi_losses, roi_predictions
from hardmine.report.draw import (
    OverlapPanel,
    Panel,
    WherePanel,
    coverage,
    overlap_sheet,
    where_sheet,
    write_panel,
)
from hardmine.report.picks import (
    Histograms,
    collect_picks,
    iou_histograms,
    overlap_of_candidates,
    plot_histograms,
    write_histograms_csv,
)
from hardmine.sample import SAMPLERS
from hardmine.structures import Assignment, Sampler, Selection

ProposalSource = Literal["rpn", "jitter"]
DEFAULT_MODEL = "faster_rcnn_tiny"
SHEET_NAME = "overview.png"
OVERLAPS_NAME = "overlaps.png"
#: The sampler the overview's other columns are compared with.
REFERENCE = "random"
HISTOGRAM_NAME = "iou_histograms"


def jitter_proposals(
    gt_boxes: Tensor,
    image_size: tuple[int, int],
    *,
    num: int = 500,
    gt_fraction: float = 0.5,
    nms_iou: float = 0.7,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Proposals such as a trained RPN gives, made without one.

    ``2 * num`` boxes are drawn: ``gt_fraction`` of them around the ground truths (an equal share
    each; centre moved by ``N(0, s)`` times the box's width and height, each side scaled by
    ``exp(N(0, s))``, with ``s ~ U(0.05, 0.5)`` per box, so that their IoU with the ground truth
    spreads from about 1 down to 0), the rest anywhere (uniform centre, sides uniform in 5-60 % of
    the image's). Like an RPN's, they are clipped to the image, scored (here by their IoU with the
    nearest ground truth, plus noise) and thinned by NMS at ``nms_iou`` (the RPN's 0.7); the
    ``num`` best are kept.

    Args:
        gt_boxes: ``float [G, 4]``.
        image_size: ``(H, W)``.
        num: at most this many proposals.
        gt_fraction: the share drawn around the ground truths (all random without any).
        nms_iou: NMS threshold.
        generator: makes the boxes reproducible.

    Returns:
        ``float [P, 4]``, ``P <= num``.
    """
    height, width = image_size
    total = 2 * num
    around = int(total * gt_fraction) if gt_boxes.shape[0] else 0

    def rand(*shape: int) -> Tensor:
        return torch.rand(shape, generator=generator)

    def randn(*shape: int) -> Tensor:
        return torch.randn(shape, generator=generator)

    gts = gt_boxes.cpu().float()
    source = gts[torch.arange(around) % max(gts.shape[0], 1)] if around else gts[:0]  # [J, 4]
    centre, size = (source[:, :2] + source[:, 2:]) / 2, source[:, 2:] - source[:, :2]
    spread = 0.05 + 0.45 * rand(around, 1)
    centre = centre + randn(around, 2) * spread * size
    size = size * torch.exp(randn(around, 2) * spread)
    extent = torch.tensor([width, height], dtype=torch.float32)
    free_centre = rand(total - around, 2) * extent
    free_size = (0.05 + 0.55 * rand(total - around, 2)) * extent
    centre, size = torch.cat([centre, free_centre]), torch.cat([size, free_size])
    boxes = clip_boxes_to_image(torch.cat([centre - size / 2, centre + size / 2], 1), image_size)
    keep = ((boxes[:, 2:] - boxes[:, :2]) >= 1).all(1)  # the RPN drops boxes under 1 px too
    boxes = boxes[keep]
    score = rand(boxes.shape[0]) * 0.1
    if gts.shape[0]:
        score = score + box_iou(boxes, gts).amax(1)
    return boxes[nms(boxes, score, nms_iou)[:num]].to(gt_boxes)


def samplers_for(
    model: nn.Module, names: Sequence[str], *, num: int | None = None
) -> dict[str, Sampler]:
    """The samplers of ``SAMPLERS`` by name, with their defaults except ``num`` picks per image.

    ``num`` defaults to the RoIs per image that ``model``'s heads train on (the tiny detectors'
    128, torchvision's 512), so that every sampler picks as many as training would.

    Raises:
        ConfigError: an unknown name, or a detector without RoI heads (a ``ValueError``).
    """
    unknown = [n for n in names if n not in SAMPLERS]
    if unknown:
        raise ConfigError(f"unknown samplers {unknown}; choose from {sorted(SAMPLERS)}")
    heads = rcnn_heads(model)
    if heads is None:
        raise ConfigError(
            f"{type(model).__name__} has no RoI heads; inspect needs Faster / Mask R-CNN"
        )
    if num is None:
        num = heads.fg_bg_sampler.batch_size_per_image
    return {n: SAMPLERS[n](num=num) for n in names}


@dataclass(frozen=True)
class InspectResult:
    """What ``inspect_picks`` wrote, and the histograms' counts.

    Attributes:
        panels: the per-image, per-sampler PNGs.
        sheet: the overview PNG (where each sampler's negatives lie).
        overlaps: the PNG of the picked negatives that overlap a positive.
        histogram_plot: the histograms' PNG.
        histogram_csv: their counts.
        histograms: the counts themselves.
    """

    panels: list[Path]
    sheet: Path
    overlaps: Path
    histogram_plot: Path
    histogram_csv: Path
    histograms: Histograms


def inspect_picks(
    model: nn.Module,
    dataset: Dataset,
    samplers: Mapping[str, Sampler],
    out_dir: str | Path,
    *,
    proposals: ProposalSource = "rpn",
    num_images: int = 4,
    hist_images: int = 64,
    batch_size: int = 4,
    seed: int = 0,
    device: torch.device | str = "cpu",
    images: Sequence[int] | None = None,
) -> InspectResult:
    """Draw each sampler's picks on the first ``num_images`` images (or on ``images``) and
    histogram its negatives over the first ``hist_images`` (see the module docstring for the
    files).

    Args:
        model: a Faster / Mask R-CNN on ``device``; left in the mode it was in.
        dataset: items ``(image, target)`` with ``boxes`` and ``labels``.
        samplers: name -> sampler; all pick from the same RoIs.
        out_dir: the output folder (created).
        proposals: ``"rpn"``: the detector's RPN in its training setting; ``"jitter"``:
            ``jitter_proposals`` with as many as the RPN keeps in training.
        num_images: images drawn.
        hist_images: images in the histograms (at least ``num_images`` are used).
        batch_size: images per forward pass.
        seed: seeds the jittered proposals and the samplers (the same for every sampler).
        device: where ``model`` is.
        images: the dataset indices to draw, instead of the first ``num_images``.

    Raises:
        ConfigError: ``model`` has no RoI heads, or a setting is out of range (a ``ValueError``).
    """
    heads = rcnn_heads(model)
    if heads is None:
        raise ConfigError(
            f"{type(model).__name__} has no RoI heads; inspect needs Faster / Mask R-CNN"
        )
    if proposals not in ("rpn", "jitter"):
        raise ConfigError(f"proposals must be 'rpn' or 'jitter', got {proposals!r}")
    if num_images < 1 or not samplers:
        raise ConfigError("inspect needs at least one image and one sampler")
    check_writable(out_dir, f"--output {out_dir}")
    out_dir = Path(out_dir)
    count = min(len(dataset), max(hist_images, num_images if images is None else 0))
    drawn = list(images) if images is not None else list(range(min(num_images, len(dataset))))
    if not drawn or not all(0 <= k < len(dataset) for k in drawn):
        raise ConfigError(f"images to draw must be indices of the dataset, got {drawn}")
    order = sorted(set(range(count)) | set(drawn))  # the histograms' images and the drawn ones
    # torchvision keeps the RPN's training setting only in this private dict.
    num_proposals = model.rpn._post_nms_top_n["training"]

    boxes: dict[int, Tensor] = {}
    assignments: dict[int, Assignment] = {}
    picks: dict[str, dict[int, Selection]] = {name: {} for name in samplers}
    starts = range(0, len(order), batch_size)
    for start in progress(starts, total=len(starts), desc="inspect"):
        indices = order[start : start + batch_size]
        items = [dataset[i] for i in indices]
        batch_images = [image.to(device) for image, _ in items]
        targets = [{k: t[k].to(device) for k in ("boxes", "labels")} for _, t in items]
        generator = torch.Generator().manual_seed(seed + indices[0])
        given = None
        if proposals == "jitter":
            given = [
                jitter_proposals(
                    t["boxes"], tuple(i.shape[-2:]), num=num_proposals, generator=generator
                )
                for i, t in zip(batch_images, targets, strict=True)
            ]
        batch = roi_batch(model, batch_images, targets, proposals=given)
        scores = None
        if any(getattr(s, "needs_scores", False) for s in samplers.values()):
            scores = roi_predictions(model, batch)
        losses = None
        if any(s.needs_losses for s in samplers.values()):
            losses = [s.loss for s in scores] if scores else roi_losses(model, batch)
        generator = torch.Generator(device).manual_seed(seed + indices[0])
        selections = collect_picks(
            batch.proposals,
            batch.assignments,
            samplers,
            losses=losses,
            scores=scores,
            generator=generator,
        )
        # Everything drawn and counted is in the original images' pixels (IoUs do not change).
        for k, b, a in zip(
            indices, batch.to_original(batch.proposals), batch.assignments, strict=True
        ):
            boxes[k], assignments[k] = b.cpu(), _cpu(a)
        for name, per_image in selections.items():
            for k, sel in zip(indices, per_image, strict=True):
                picks[name][k] = Selection(sel.mask.cpu(), sel.weight.cpu())

    grid, where, overlaps = [], [], []
    reference = REFERENCE if REFERENCE in samplers else next(iter(samplers))
    lookalikes = dataset.scenes if isinstance(dataset, SceneDataset) else None
    for k in drawn:
        image, target = dataset[k]
        grid.append(
            [
                Panel(image, target["boxes"], boxes[k], assignments[k], picks[name][k], title=name)
                for name in samplers
            ]
        )
        shape = tuple(image.shape[-2:])
        negative = assignments[k].negative
        density = {
            name: coverage(boxes[k][picks[name][k].mask & negative], shape) for name in samplers
        }
        (iou_pn,) = overlap_of_candidates([boxes[k]], [assignments[k]])
        look = lookalikes[k].lookalike_boxes if lookalikes is not None else None
        where.append(
            [
                WherePanel(
                    image,
                    target["boxes"],
                    density[name],
                    None if name == reference else density[reference],
                    name if name == reference else f"{name} − {reference}",
                    lookalikes=look,
                )
                for name in samplers
            ]
        )
        overlaps.append(
            [
                OverlapPanel(
                    image, target["boxes"], boxes[k], iou_pn, negative, picks[name][k], name
                )
                for name in samplers
            ]
        )
    panel_paths = [
        write_panel(panel, out_dir / "panels" / f"image{k:03d}_{panel.title}.png")
        for k, row in zip(drawn, grid, strict=True)
        for panel in row
    ]
    for stale in set((out_dir / "panels").glob("image*_*.png")) - set(panel_paths):
        stale.unlink()
    labels = [f"image {k}" for k in drawn]
    sheet = where_sheet(where, out_dir / SHEET_NAME, row_labels=labels)
    overlap_path = overlap_sheet(overlaps, out_dir / OVERLAPS_NAME, row_labels=labels)
    counted = list(range(count)) or drawn
    histograms = iou_histograms(
        [boxes[k] for k in counted],
        [assignments[k] for k in counted],
        {name: [picks[name][k] for k in counted] for name in samplers},
    )
    return InspectResult(
        panels=panel_paths,
        sheet=sheet,
        overlaps=overlap_path,
        histogram_plot=plot_histograms(histograms, out_dir / f"{HISTOGRAM_NAME}.png"),
        histogram_csv=write_histograms_csv(histograms, out_dir / f"{HISTOGRAM_NAME}.csv"),
        histograms=histograms,
    )


def showcase_images(dataset: Dataset, num: int) -> list[int] | None:
    """On the built-in scenes, the first ``num`` images with both a crowd group and a look-alike
    (each sampler then has its case in the picture); None for other data, or too few such."""
    if not isinstance(dataset, SceneDataset):
        return None
    both = [
        k
        for k, scene in enumerate(dataset.scenes)
        if (scene.crowd >= 0).any() and len(scene.lookalike_boxes)
    ]
    return both[:num] if len(both) >= num else None


def _cpu(assignment: Assignment) -> Assignment:
    return Assignment(
        label=assignment.label.cpu(),
        gt_index=assignment.gt_index.cpu(),
        max_iou=assignment.max_iou.cpu(),
        gt_class=assignment.gt_class.cpu(),
    )


def inspect_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    samplers: Sequence[str] = tuple(SAMPLERS),
    proposals: ProposalSource = "rpn",
    num_images: int = 4,
    hist_images: int = 64,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> InspectResult:
    """``inspect_picks`` with a run's trained detector on the run's training set (for reports);
    on the built-in scenes, drawn on images with a crowd group and a look-alike.

    Args:
        run_dir: a run directory of ``hardmine train``.
        out_dir: the output folder.
        samplers: names in ``SAMPLERS``; each picks as many RoIs as the run's heads train on.
        proposals, num_images, hist_images, seed: as ``inspect_picks``.
        device: where to run the detector.
    """
    device = torch.device(device)
    run = load_run(run_dir, device=device)
    return inspect_picks(
        run.model,
        run.train_set,
        samplers_for(run.model, samplers),
        out_dir,
        proposals=proposals,
        num_images=num_images,
        hist_images=hist_images,
        seed=seed,
        device=device,
        images=showcase_images(run.train_set, num_images),
    )


def load_data(spec: str, *, num_images: int, image_dir: str | None = None) -> Dataset:
    """``"scenes"`` / ``"scenes:val"``: the first ``num_images`` built-in scenes of that split
    (the harness's seeds, 128 px, 3 classes); otherwise the path of a COCO JSON whose images lie
    in ``image_dir`` (default: the JSON's folder)."""
    if spec in ("scenes", "scenes:train", "scenes:val"):
        return make_scenes("val" if spec.endswith(":val") else "train", num_images=num_images)
    path = Path(spec)
    return CocoDataset(image_dir if image_dir is not None else path.parent, path)
