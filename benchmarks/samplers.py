"""Milliseconds per image for every hardmine assigner and sampler, beside baselines, in one run.

Inputs are realistic for a two-stage detector: one 800x1333 image holds 20 ground truths and 2000
proposals (70% jittered around the ground truths, 30% anywhere); ATSS sees five pyramid levels
(strides 8-128) with one anchor per location, about 22k anchors. Each method is timed on batches of
2 and 16 images beside:

- torchvision: ``box_iou`` + ``Matcher`` + ``BalancedPositiveNegativeSampler`` (the detector's own
  random sampling), for the max-IoU assigner, the random sampler, and the two together (what a
  detector runs each step);
- MMDetection 3.x's own classes (``ATSSAssigner``, ``MaxIoUAssigner``, ``CombinedSampler`` of
  ``InstanceBalancedPosSampler`` + ``IoUBalancedNegSampler``, ``RandomSampler``), one image a call
  as MMDetection runs them, when ``import mmdet`` works (``benchmarks/_mmdet.py`` says how to
  install it beside hardmine, never as its dependency);
- loop: a plain per-image version of the same algorithm, written the way MMDetection writes it
  (one image at a time, a Python loop over IoU bins, ground truths or pyramid levels,
  ``randperm`` per group), which needs nothing but torch.

Timings interleave the contenders round by round, in a fresh random order each round, and report
medians, so machine noise hits both sides of a ratio alike. Ratios above 1 mean hardmine is faster.
The target column is issue 14's. ``--clock thread`` times CPU time of the calling thread instead of
wall time: on a loaded machine it leaves out the time the process waits for a core (use it with
``--threads 1`` only).

    python benchmarks/samplers.py [--threads 1] [--rounds 15] [--device cpu] [--clock wall]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, Matcher
from torchvision.ops import box_iou, nms

import _mmdet
from hardmine.assign import assign_atss, assign_max_iou
from hardmine.sample import sample_iou_balanced, sample_ohem, sample_overlap, sample_random
from hardmine.structures import Assignment

IMAGE_H, IMAGE_W = 800, 1333
NUM_GT, NUM_PROPOSALS = 20, 2000
STRIDES = (8, 16, 32, 64, 128)


@dataclass
class Batch:
    gt_boxes: list[Tensor]
    gt_labels: list[Tensor]
    proposals: list[Tensor]
    losses: list[Tensor]
    anchors: Tensor
    num_per_level: list[int]


def _random_boxes(n: int, g: torch.Generator) -> Tensor:
    wh = torch.rand(n, 2, generator=g) * torch.tensor([300.0, 300.0]) + 16  # [n, 2]
    xy = torch.rand(n, 2, generator=g) * torch.tensor([IMAGE_W, IMAGE_H]) - wh / 2
    return (
        torch.cat([xy, xy + wh], dim=1)
        .clamp(min=0)
        .minimum(torch.tensor([IMAGE_W, IMAGE_H, IMAGE_W, IMAGE_H], dtype=torch.float32))
    )


def _proposals_around(gt: Tensor, n: int, g: torch.Generator) -> Tensor:
    near = int(n * 0.7)
    src = gt[torch.randint(len(gt), (near,), generator=g)]  # [near, 4]
    wh = (src[:, 2:] - src[:, :2]).repeat(1, 2)
    jitter = (torch.rand(near, 4, generator=g) - 0.5) * wh * 0.8
    return torch.cat([src + jitter, _random_boxes(n - near, g)])


def _anchors() -> tuple[Tensor, list[int]]:
    levels = []
    for stride in STRIDES:
        ys = torch.arange(0, -(-IMAGE_H // stride), dtype=torch.float32) * stride + stride / 2
        xs = torch.arange(0, -(-IMAGE_W // stride), dtype=torch.float32) * stride + stride / 2
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        half = 4 * stride  # one square anchor of scale 8 per location, as in the ATSS paper
        c = torch.stack([cx.flatten(), cy.flatten()], dim=1)
        levels.append(torch.cat([c - half, c + half], dim=1))
    return torch.cat(levels), [len(a) for a in levels]


def make_batch(num_images: int, *, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    gts = [_random_boxes(NUM_GT, g) for _ in range(num_images)]
    anchors, num_per_level = _anchors()
    return Batch(
        gt_boxes=gts,
        gt_labels=[torch.randint(1, 81, (NUM_GT,), generator=g) for _ in gts],
        proposals=[_proposals_around(gt, NUM_PROPOSALS, g) for gt in gts],
        losses=[torch.rand(NUM_PROPOSALS, generator=g).pow(3) * 4 for _ in gts],
        anchors=anchors,
        num_per_level=num_per_level,
    )


def to_device(batch: Batch, device: torch.device) -> Batch:
    return Batch(
        gt_boxes=[t.to(device) for t in batch.gt_boxes],
        gt_labels=[t.to(device) for t in batch.gt_labels],
        proposals=[t.to(device) for t in batch.proposals],
        losses=[t.to(device) for t in batch.losses],
        anchors=batch.anchors.to(device),
        num_per_level=batch.num_per_level,
    )


# --- baselines: torchvision, and per-image loops written as MMDetection writes them ---


def torchvision_assign(b: Batch) -> list[Tensor]:
    matcher = Matcher(0.5, 0.5, allow_low_quality_matches=False)
    return [matcher(box_iou(gt, p)) for gt, p in zip(b.gt_boxes, b.proposals, strict=True)]


def torchvision_labels(b: Batch, matched: list[Tensor]) -> list[Tensor]:
    # As RoIHeads.assign_targets_to_proposals: -1 ignore, 0 background, >0 class.
    out = []
    for m, labels in zip(matched, b.gt_labels, strict=True):
        lab = labels[m.clamp(min=0)]
        lab[m == Matcher.BELOW_LOW_THRESHOLD] = 0
        lab[m == Matcher.BETWEEN_THRESHOLDS] = -1
        out.append(lab)
    return out


def torchvision_sample(labels: list[Tensor]) -> list[Tensor]:
    pos, neg = BalancedPositiveNegativeSampler(512, 0.25)(labels)
    return [p | n for p, n in zip(pos, neg, strict=True)]


def loop_iou_balanced(assignments: list[Assignment], *, num: int = 512, num_bins: int = 3) -> None:
    for a in assignments:
        pos = torch.nonzero(a.label == 1).flatten()
        neg = torch.nonzero(a.label == 0).flatten()
        num_pos = min(len(pos), int(num * 0.25))
        gts = a.gt_index[pos].unique()
        per_gt = round(num_pos / max(len(gts), 1))
        chosen = []
        for gt in gts:  # instance-balanced positives
            inds = pos[a.gt_index[pos] == gt]
            chosen.append(inds[torch.randperm(len(inds))[:per_gt]])
        num_neg = min(len(neg), num - num_pos)
        per_bin = num_neg // num_bins
        ious = a.max_iou[neg]
        picked = []
        for i in range(num_bins):  # IoU-balanced negatives
            lo, hi = 0.5 * i / num_bins, 0.5 * (i + 1) / num_bins
            inds = neg[(ious >= lo) & (ious < hi)]
            picked.append(inds[torch.randperm(len(inds))[:per_bin]])
        taken = torch.cat(picked)
        rest = neg[~torch.isin(neg, taken)]
        short = num_neg - len(taken)
        if short > 0:
            picked.append(rest[torch.randperm(len(rest))[:short]])


def loop_ohem(b: Batch, *, num: int = 128) -> None:
    for boxes, loss in zip(b.proposals, b.losses, strict=True):
        nms(boxes, loss, 0.7)[:num]


def loop_atss(b: Batch, *, topk: int = 9) -> None:
    centers = (b.anchors[:, :2] + b.anchors[:, 2:]) / 2  # [N, 2]
    for gt in b.gt_boxes:
        overlaps = box_iou(b.anchors, gt)  # [N, G]
        gt_centers = (gt[:, :2] + gt[:, 2:]) / 2
        dist = torch.cdist(centers, gt_centers)  # [N, G]
        candidates, start = [], 0
        for n in b.num_per_level:
            _, idx = dist[start : start + n].topk(min(topk, n), dim=0, largest=False)
            candidates.append(idx + start)
            start += n
        cand = torch.cat(candidates)  # [K * L, G]
        cand_iou = overlaps[cand, torch.arange(len(gt), device=gt.device)]
        is_pos = cand_iou >= cand_iou.mean(0) + cand_iou.std(0)
        cx, cy = centers[cand, 0], centers[cand, 1]
        inside = (
            torch.stack([cx - gt[:, 0], cy - gt[:, 1], gt[:, 2] - cx, gt[:, 3] - cy]).amin(0) > 0.01
        )
        is_pos &= inside
        masked = torch.full_like(overlaps, float("-inf")).t().flatten()
        flat = (cand + torch.arange(len(gt), device=gt.device) * len(b.anchors)).flatten()[
            is_pos.flatten()
        ]
        masked[flat] = overlaps.t().flatten()[flat]
        masked.view(len(gt), -1).max(0)


def per_image(fn: Callable[[Batch, int], object], b: Batch) -> Callable[[], None]:
    def run() -> None:
        for i in range(len(b.gt_boxes)):
            fn(b, i)

    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def race(
    contenders: dict[str, Callable[[], object]],
    rounds: int,
    device: torch.device,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median seconds per call for each contender, timed in interleaved rounds."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for fn in contenders.values():  # warm-up
        fn()
    order, names = random.Random(0), list(contenders)
    for _ in range(rounds):
        order.shuffle(names)
        for name in names:
            _sync(device)
            start = clock()
            contenders[name]()
            _sync(device)
            times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


@dataclass
class Row:
    """One method of the table: hardmine's call and its baselines (name -> call, target)."""

    name: str
    ours: Callable[[], object]
    baselines: dict[str, tuple[Callable[[], object], str]]
    absolute_target: str = ""


def contenders_for(b: Batch, device: torch.device, mm: _mmdet.MMDet | None) -> list[Row]:
    """Rows of the table for one batch."""
    size = len(b.gt_boxes)
    gen = torch.Generator(device=device).manual_seed(0)
    assigned = assign_max_iou(b.proposals, b.gt_boxes, b.gt_labels)
    tv_labels = torchvision_labels(b, torchvision_assign(b))
    single = [
        assign_max_iou([p], [g], [lab])
        for p, g, lab in zip(b.proposals, b.gt_boxes, b.gt_labels, strict=True)
    ]
    anchors = [b.anchors] * size
    ref = {} if mm is None else _mmdet.contenders(mm, b, anchors)
    random_target = ">= 1.0x" if size >= 16 else ">= 0.8x"

    def overlap_one_by_one(bb: Batch, i: int) -> object:
        return sample_overlap([bb.proposals[i]], single[i], generator=gen)

    def with_mmdet(baselines: dict, name: str, key: str, target: str = "") -> dict:
        if key in ref:
            baselines[f"MMDetection {name}"] = (ref[key], target)
        return baselines

    return [
        Row(
            "ATSS assign (22k anchors)",
            lambda: assign_atss(anchors, b.gt_boxes, b.gt_labels, num_per_level=b.num_per_level),
            with_mmdet(
                {"per-image loop": (lambda: loop_atss(b), "")}, "ATSSAssigner", "atss", ">= 10x"
            ),
        ),
        Row(
            "IoU-balanced sample",
            lambda: sample_iou_balanced(assigned, generator=gen),
            with_mmdet(
                {"per-image loop": (lambda: loop_iou_balanced(assigned), "")},
                "CombinedSampler",
                "combined",
                ">= 10x",
            ),
        ),
        Row(
            "random sample",
            lambda: sample_random(assigned, generator=gen),
            with_mmdet(
                {"torchvision BPNS": (lambda: torchvision_sample(tv_labels), random_target)},
                "RandomSampler",
                "random",
            ),
        ),
        Row(
            "max-IoU assign",
            lambda: assign_max_iou(b.proposals, b.gt_boxes, b.gt_labels),
            with_mmdet(
                {"torchvision Matcher": (lambda: torchvision_assign(b), ">= 2x")},
                "MaxIoUAssigner",
                "max_iou",
            ),
        ),
        Row(
            "assign + random sample",
            lambda: sample_random(
                assign_max_iou(b.proposals, b.gt_boxes, b.gt_labels), generator=gen
            ),
            {
                "torchvision Matcher+BPNS": (
                    lambda: torchvision_sample(torchvision_labels(b, torchvision_assign(b))),
                    "",
                )
            },
        ),
        Row(
            "overlap sample (soft)",
            lambda: sample_overlap(b.proposals, assigned, generator=gen),
            {"ours, one image a call": (per_image(overlap_one_by_one, b), "")},
            absolute_target="<= 2 ms",
        ),
        Row(
            "OHEM (NMS 0.7, top 128)",
            lambda: sample_ohem(b.proposals, assigned, b.losses),
            {"per-image loop": (lambda: loop_ohem(b), "")},
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per contender")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 16])
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall")
    parser.add_argument("--no-mmdet", action="store_true", help="leave MMDetection out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    mm, why = (None, "MMDetection left out (--no-mmdet)") if args.no_mmdet else _mmdet.load()
    if mm is not None and device.type != "cpu":
        mm, why = None, "MMDetection left out: its classes are timed on the CPU only"
    print(
        f"torch {torch.__version__}, device {device}, {args.threads} thread(s), {args.clock} "
        f"clock, medians of {args.rounds} interleaved rounds; ms per image; "
        "ratio = baseline / hardmine"
    )
    print(why)
    header = (
        f"{'method':<28}{'B':>4}{'hardmine':>10}  {'baseline':<32}{'ms':>9}{'ratio':>8}  target"
    )
    print(header)
    print("-" * len(header))
    for size in args.batches:
        b = to_device(make_batch(size), device)
        for row in contenders_for(b, device, mm):
            calls = {"ours": row.ours} | {name: fn for name, (fn, _) in row.baselines.items()}
            t = race(calls, args.rounds, device, clock)
            ours = t["ours"] * 1e3 / size
            for name, (_, target) in row.baselines.items():
                base = t[name] * 1e3 / size
                print(
                    f"{row.name:<28}{size:>4}{ours:>10.3f}  {name:<32}{base:>9.3f}"
                    f"{base / ours:>7.2f}x  {target}"
                )
            if row.absolute_target:
                print(
                    f"{row.name:<28}{size:>4}{ours:>10.3f}  {'(absolute)':<32}{'':>17}  "
                    f"{row.absolute_target}"
                )


if __name__ == "__main__":
    main()
