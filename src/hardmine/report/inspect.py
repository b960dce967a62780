"""``hardmine inspect``: see what each sampler picks on the same RoIs.

For a batch of images the detector gives the RoIs as its RoI heads see them in training
(``hardmine.engine.roi_loss.roi_batch``: the RPN's training proposals plus the ground truths,
max-IoU assignment with the heads' thresholds, torchvision's 0.5 / 0.5), every RoI's loss from the
read-only OHEM pass, and then every sampler picks from the same RoIs with the same seed. Written to
the output folder:

- ``panels/image<k>_<sampler>.png``: one drawing per image and sampler (``report.draw``);
- ``overview.png``: all of them, one row per image, one column per sampler;
- ``iou_histograms.png`` / ``.csv``: the picked negatives' IoU with the ground truth and with the
  positives, over more images (``report.picks``).

An untrained detector's RPN proposes nearly random boxes, so without a trained run the proposals
are made by jittering the ground truths instead (``jitter_proposals``); the RoI losses then still
come from the (untrained) detector.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision.ops import box_iou, clip_boxes_to_image, nms

from hardmine.config import ConfigError, load_config
from hardmine.data import CocoDataset, SceneDataset
from hardmine.engine import checkpoint
from hardmine.engine.distributed import resolve_device
from hardmine.engine.roi_loss import rcnn_heads, roi_batch, roi_losses
from hardmine.engine.train import (
    CONFIG_NAME,
    SCENE_SEEDS,
    PickCounter,
    build_datasets,
    build_detector,
)
from hardmine.models import build
from hardmine.report.draw import Panel, overview_sheet, write_panel
from hardmine.report.picks import (
    Histograms,
    collect_picks,
    iou_histograms,
    plot_histograms,
    write_histograms_csv,
)
from hardmine.sample import SAMPLERS
from hardmine.structures import Assignment, Sampler, Selection

ProposalSource = Literal["rpn", "jitter"]
DEFAULT_MODEL = "faster_rcnn_tiny"
SHEET_NAME = "overview.png"
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
        ValueError: an unknown name, or a detector without RoI heads.
    """
    unknown = [n for n in names if n not in SAMPLERS]
    if unknown:
        raise ValueError(f"unknown samplers {unknown}; choose from {sorted(SAMPLERS)}")
    heads = rcnn_heads(model)
    if heads is None:
        raise ValueError(
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
        sheet: the overview PNG.
        histogram_plot: the histograms' PNG.
        histogram_csv: their counts.
        histograms: the counts themselves.
    """

    panels: list[Path]
    sheet: Path
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
) -> InspectResult:
    """Draw each sampler's picks on the first ``num_images`` images and histogram its negatives
    over the first ``hist_images`` (see the module docstring for the files).

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

    Raises:
        ValueError: ``model`` has no RoI heads, or a setting is out of range.
    """
    heads = rcnn_heads(model)
    if heads is None:
        raise ValueError(
            f"{type(model).__name__} has no RoI heads; inspect needs Faster / Mask R-CNN"
        )
    if proposals not in ("rpn", "jitter"):
        raise ValueError(f"proposals must be 'rpn' or 'jitter', got {proposals!r}")
    if num_images < 1 or not samplers:
        raise ValueError("inspect needs at least one image and one sampler")
    out_dir = Path(out_dir)
    count = min(len(dataset), max(num_images, hist_images))
    # torchvision keeps the RPN's training setting only in this private dict.
    num_proposals = model.rpn._post_nms_top_n["training"]

    boxes: list[Tensor] = []
    assignments: list[Assignment] = []
    picks: dict[str, list[Selection]] = {name: [] for name in samplers}
    for start in range(0, count, batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, count))]
        batch_images = [image.to(device) for image, _ in items]
        targets = [{k: t[k].to(device) for k in ("boxes", "labels")} for _, t in items]
        generator = torch.Generator().manual_seed(seed + start)
        given = None
        if proposals == "jitter":
            given = [
                jitter_proposals(
                    t["boxes"], tuple(i.shape[-2:]), num=num_proposals, generator=generator
                )
                for i, t in zip(batch_images, targets, strict=True)
            ]
        batch = roi_batch(model, batch_images, targets, proposals=given)
        losses = (
            roi_losses(model, batch) if any(s.needs_losses for s in samplers.values()) else None
        )
        generator = torch.Generator(device).manual_seed(seed + start)
        selections = collect_picks(
            batch.proposals, batch.assignments, samplers, losses=losses, generator=generator
        )
        # Everything drawn and counted is in the original images' pixels (IoUs do not change).
        boxes += [b.cpu() for b in batch.to_original(batch.proposals)]
        assignments += [_cpu(a) for a in batch.assignments]
        for name, per_image in selections.items():
            picks[name] += [Selection(s.mask.cpu(), s.weight.cpu()) for s in per_image]

    drawn = min(num_images, count)
    grid = []
    for k in range(drawn):
        image, target = dataset[k]
        grid.append(
            [
                Panel(image, target["boxes"], boxes[k], assignments[k], picks[name][k], title=name)
                for name in samplers
            ]
        )
    panel_paths = [
        write_panel(panel, out_dir / "panels" / f"image{k:03d}_{panel.title}.png")
        for k, row in enumerate(grid)
        for panel in row
    ]
    sheet = overview_sheet(
        grid, out_dir / SHEET_NAME, row_labels=[f"image {k}" for k in range(drawn)]
    )
    histograms = iou_histograms(boxes, assignments, picks)
    return InspectResult(
        panels=panel_paths,
        sheet=sheet,
        histogram_plot=plot_histograms(histograms, out_dir / f"{HISTOGRAM_NAME}.png"),
        histogram_csv=write_histograms_csv(histograms, out_dir / f"{HISTOGRAM_NAME}.csv"),
        histograms=histograms,
    )


def _cpu(assignment: Assignment) -> Assignment:
    return Assignment(
        label=assignment.label.cpu(),
        gt_index=assignment.gt_index.cpu(),
        max_iou=assignment.max_iou.cpu(),
        gt_class=assignment.gt_class.cpu(),
    )


def load_run(run_dir: str | Path, *, device: torch.device) -> tuple[nn.Module, Dataset]:
    """A run's detector with its latest checkpoint's weights, and the run's training set."""
    run_dir = Path(run_dir)
    config = load_config(run_dir / CONFIG_NAME)
    train_set, _, categories = build_datasets(config)
    model = build_detector(config, len(categories), PickCounter())
    state = checkpoint.load(run_dir / checkpoint.CHECKPOINT_NAME, map_location=device)
    model.load_state_dict(state["model"])
    return model.to(device), train_set


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
    """``inspect_picks`` with a run's trained detector on the run's training set (for reports).

    Args:
        run_dir: a run directory of ``hardmine train``.
        out_dir: the output folder.
        samplers: names in ``SAMPLERS``; each picks as many RoIs as the run's heads train on.
        proposals, num_images, hist_images, seed: as ``inspect_picks``.
        device: where to run the detector.
    """
    device = torch.device(device)
    model, train_set = load_run(run_dir, device=device)
    return inspect_picks(
        model,
        train_set,
        samplers_for(model, samplers),
        out_dir,
        proposals=proposals,
        num_images=num_images,
        hist_images=hist_images,
        seed=seed,
        device=device,
    )


def load_data(spec: str, *, num_images: int, image_dir: str | None = None) -> Dataset:
    """``"scenes"`` / ``"scenes:val"``: the first ``num_images`` built-in scenes of that split
    (the harness's seeds, 128 px, 3 classes); otherwise the path of a COCO JSON whose images lie
    in ``image_dir`` (default: the JSON's folder)."""
    if spec in ("scenes", "scenes:train", "scenes:val"):
        split = "val" if spec.endswith(":val") else "train"
        return SceneDataset(num_images, seed=SCENE_SEEDS[split])
    path = Path(spec)
    return CocoDataset(image_dir if image_dir is not None else path.parent, path)


def inspect_parser(subparsers: Any) -> None:
    """``hardmine inspect``."""
    parser = subparsers.add_parser(
        "inspect",
        help="draw what each sampler picks and histogram the IoU of its negatives",
        description="Run every sampler on the same RoIs of a detector and write, to --output: "
        "panels/ (one drawing per image and sampler: ground truths white, picked positives "
        "solid, negatives dashed, coloured by IoU with the ground truth, line width by loss "
        "weight), overview.png (all panels), and iou_histograms.png / .csv (the picked "
        "negatives' IoU with the ground truth and with the positives, IoU(p,n)). Without --run "
        "the detector is untrained and the proposals default to --proposals jitter, boxes "
        "jittered around the ground truths as a trained RPN would give; with --run they default "
        "to the run's RPN.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--data",
        metavar="SPEC",
        help="'scenes' or 'scenes:val' (built-in scenes), or a COCO JSON (images in --image-dir); "
        "default: the run's training set with --run, else 'scenes'",
    )
    parser.add_argument("--image-dir", metavar="DIR", help="images of a COCO --data")
    parser.add_argument("--run", metavar="DIR", help="a run directory: its trained detector")
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"untrained detector without --run (default: {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--proposals",
        choices=["rpn", "jitter"],
        help="RoIs from the detector's RPN (training setting) or jittered ground truths "
        "(default: rpn with --run, jitter without)",
    )
    parser.add_argument(
        "--images", type=int, default=4, metavar="N", help="images drawn (default: 4)"
    )
    parser.add_argument(
        "--hist-images",
        type=int,
        default=64,
        metavar="M",
        help="images in the histograms (default: 64)",
    )
    parser.add_argument(
        "--samplers",
        default=",".join(SAMPLERS),
        metavar="A,B",
        help=f"comma-separated samplers (default: {','.join(SAMPLERS)})",
    )
    parser.add_argument(
        "--num",
        type=int,
        metavar="K",
        help="picks per image for every sampler (default: the detector's RoI batch per image)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of proposals and picks")
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA when available), cpu or cuda (default: auto)"
    )
    parser.add_argument(
        "--output",
        default="runs/inspect",
        metavar="DIR",
        help="output folder (default: runs/inspect)",
    )
    parser.set_defaults(command=inspect_command, takes_overrides=False)


def inspect_command(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    """Run ``hardmine inspect`` (``overrides`` is empty: the command takes none)."""
    device = resolve_device(args.device)
    count = max(args.images, args.hist_images)
    if args.run is not None:
        model, dataset = load_run(args.run, device=device)
        if args.data is not None:
            dataset = load_data(args.data, num_images=count, image_dir=args.image_dir)
    else:
        dataset = load_data(args.data or "scenes", num_images=count, image_dir=args.image_dir)
        torch.manual_seed(args.seed)
        model = build(args.model, len(dataset.categories) + 1).to(device)
    try:
        samplers = samplers_for(model, args.samplers.split(","), num=args.num)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    source = args.proposals or ("rpn" if args.run is not None else "jitter")
    result = inspect_picks(
        model,
        dataset,
        samplers,
        args.output,
        proposals=source,
        num_images=args.images,
        hist_images=args.hist_images,
        seed=args.seed,
        device=device,
    )
    hist = result.histograms
    print(f"{len(result.panels)} panels, {result.sheet}, {result.histogram_plot}")
    for name in hist.names:
        pn, gt = hist.share("iou_pn", name, 0.5), hist.share("iou_gt", name, 0.4, 0.5)
        print(
            f"{name:>14}: {hist.total(name):6d} negatives, IoU(p,n) >= 0.5: {_pct(pn)}, "
            f"IoU with GT in [0.4, 0.5): {_pct(gt)}"
        )
    return 0


def _pct(value: float) -> str:
    return "  n/a" if math.isnan(value) else f"{100 * value:5.1f}%"
