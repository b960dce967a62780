"""Does OHEM pick the same RoIs when its read-only pass scores in bfloat16? On a trained run.

For batches of the run's training images, the RoIs are scored twice by the trained detector's
read-only pass (``hardmine.models.read_only.score_rois``), in float32 and under autocast in
``--dtype``, and OHEM (``sample_ohem`` with the run's sampler settings, or the paper's: 128 per
image, NMS 0.7) picks from each. Printed: the share of float32's picks that the low-precision
scores pick too (per image: mean and minimum), and the largest relative difference of the losses.
A share of at least 98% is what ``SamplingRoIHeads`` asks before it scores in bfloat16 by default.

    python benchmarks/score_dtype.py RUN_DIR [--batches 40] [--proposals 2000] [--dtype bfloat16]

``RUN_DIR`` is a finished Faster R-CNN run (``hardmine train``), e.g. the tiny model on scenes.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from hardmine.engine.rundir import load_run
from hardmine.models.read_only import RoIBatch, rcnn_heads, roi_batch, score_rois
from hardmine.sample import OHEMSampler, sample_ohem
from hardmine.structures import settings


def _picks(batch: RoIBatch, losses: list[torch.Tensor], sampler: OHEMSampler) -> list[torch.Tensor]:
    opts = settings(sampler)
    return [s.mask for s in sample_ohem(batch.proposals, batch.assignments, losses, **opts)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--batches", type=int, default=40, help="batches of training images")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--proposals", type=int, default=2000, help="RPN proposals per image")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {
        "model.rpn_pre_nms_top_n_train": 2 * args.proposals,
        "model.rpn_post_nms_top_n_train": args.proposals,
    }
    run = load_run(args.run_dir, overrides=overrides)
    heads = rcnn_heads(run.model)
    if heads is None:
        raise SystemExit(f"{args.run_dir}: not a Faster / Mask R-CNN run")
    sampler = getattr(heads, "sampler", None)
    sampler = sampler if isinstance(sampler, OHEMSampler) else OHEMSampler()
    dtype = getattr(torch, args.dtype)

    shares, worst_rel = [], 0.0
    picked = 0
    for start in range(0, args.batches * args.batch_size, args.batch_size):
        items = [
            run.train_set[i % len(run.train_set)] for i in range(start, start + args.batch_size)
        ]
        images = [image for image, _ in items]
        targets = [{"boxes": t["boxes"], "labels": t["labels"]} for _, t in items]
        batch = roi_batch(run.model, images, targets)
        scored = {
            name: score_rois(
                heads,
                batch.features,
                batch.proposals,
                batch.image_sizes,
                batch.gt_boxes,
                batch.assignments,
                score_dtype=score_dtype,
            )
            for name, score_dtype in [("float32", None), (args.dtype, dtype)]
        }
        exact, low = (_picks(batch, scored[n], sampler) for n in ("float32", args.dtype))
        for a, b, la, lb in zip(exact, low, scored["float32"], scored[args.dtype], strict=True):
            n = int(a.sum())
            picked += n
            shares.append(int((a & b).sum()) / max(n, 1))
            rel = ((la - lb).abs() / la.abs().clamp(min=1e-6)).max()
            worst_rel = max(worst_rel, float(rel))
    print(
        f"{args.run_dir}: {len(shares)} images, {args.proposals} proposals each, OHEM "
        f"num={sampler.num} nms={sampler.nms_iou}; {picked} float32 picks"
    )
    print(
        f"{args.dtype} picks the same RoIs as float32: mean {100 * statistics.mean(shares):.2f}% "
        f"per image, worst image {100 * min(shares):.2f}%; largest relative loss difference "
        f"{worst_rel:.3g}"
    )


if __name__ == "__main__":
    main()
