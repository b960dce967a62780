"""Seconds per training step and peak memory of every sampler, as ratios to random sampling.

The comparison is at equal RoIs per image (``--num``, default 128: the OHEM paper's B = 128 RoIs
per batch, all from one image with N = 1, Table 1 row 11; its default N = 2 takes 64 per image):
every sampler's training pass then costs the same, and what is measured is each sampler's own
overhead, for OHEM the read-only pass of the box head over all proposals (``--proposals`` per
image). ``torchvision`` is the unwrapped model with torchvision's own sampler at the same ``num``,
and ``random@512`` random sampling at torchvision's default 512 RoIs per image, for reference;
``ohem`` scores in its default precision (``score_dtype="auto"``: bfloat16 where the hardware has
it, printed) and ``ohem@f32`` in float32 (``score_dtype=None``). The read-only pass is
also timed inside OHEM's steps and printed as a fraction of random sampling's step: OHEM's own
cost measured directly, steadier than the ratio of two medians.
No optimiser step is taken, so every sampler sees the same weights.

Time: the samplers' steps are interleaved (one step of each, in a freshly shuffled order,
``--steps`` times) so that drift in the machine's load, and whatever one step leaves behind for
the next, hits all of them alike; the median is reported. ``--clock thread`` times the CPU time of
the calling thread instead of wall time: on a loaded machine it leaves out the time the process
waits for a core (use it with ``--threads 1`` on the CPU only: every step then runs in that
thread).

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` over the steps (reset per sampler). On CPU no
allocator statistic sees torch's tensors (``tracemalloc`` does not), so each sampler runs in its
own subprocess and reports its peak resident set size (``ru_maxrss``) minus the resident size just
before its first step: the memory a training step adds on top of the process, model and batch.
The absolute peak RSS is printed too; its ratios are diluted by the ~0.3-0.5 GB of the process.

Example::

    python benchmarks/train_step.py --model faster_rcnn_tiny --steps 20
    python benchmarks/train_step.py --device cuda --model faster_rcnn_r50_fpn --image-size 800 --amp
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from hardmine.models import SamplingRoIHeads, build, with_sampler
from hardmine.models.read_only import resolve_score_dtype
from hardmine.sample import SAMPLERS, RandomSampler

Batch = tuple[list[Tensor], list[dict[str, Tensor]]]


def make_batch(args: argparse.Namespace) -> Batch:
    """``--batch`` random images of ``--image-size`` px, ``--objects`` boxes (and masks) each."""
    g = torch.Generator().manual_seed(0)
    size = args.image_size
    images, targets = [], []
    for _ in range(args.batch):
        xy = torch.rand(args.objects, 2, generator=g) * size * 0.7
        wh = (torch.rand(args.objects, 2, generator=g) * 0.25 + 0.05) * size
        boxes = torch.cat([xy, (xy + wh).clamp(max=size - 1)], dim=1)
        masks = torch.zeros(args.objects, size, size, dtype=torch.uint8)  # boxes, filled
        for m, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist(), strict=True):
            m[y0:y1, x0:x1] = 1
        labels = torch.randint(1, args.num_classes, (args.objects,), generator=g)
        images.append(torch.rand(3, size, size, generator=g).to(args.device))
        target = {"boxes": boxes, "labels": labels}
        if "mask" in args.model:
            target["masks"] = masks
        targets.append({k: v.to(args.device) for k, v in target.items()})
    return images, targets


def make_models(args: argparse.Namespace) -> dict[str, nn.Module]:
    """The same detector (same weights) with every sampler, plus torchvision's own sampler."""
    torch.manual_seed(0)
    kwargs = {
        "min_size": args.image_size,
        "max_size": args.image_size,
        "rpn_pre_nms_top_n_train": 2 * args.proposals,
        "rpn_post_nms_top_n_train": args.proposals,
        "box_batch_size_per_image": args.num,
    }
    base = build(args.model, args.num_classes, **kwargs).to(args.device).train()
    models = {"torchvision": base}
    for name, cls in SAMPLERS.items():
        models[name] = with_sampler(base, cls(num=args.num)).train()
    # OHEM with its read-only pass in float32 (``score_dtype=None``), beside the default "auto".
    models["ohem@f32"] = with_sampler(
        base, SAMPLERS["ohem"](num=args.num), score_dtype=None
    ).train()
    # torchvision's default 512 RoIs per image: what OHEM at 128 replaces in practice.
    models["random@512"] = with_sampler(base, RandomSampler(num=512)).train()
    if args.samplers:
        models = {name: models[name] for name in ["random", *args.samplers] if name in models}
    return models


AMP = False  # --amp: forward passes under float16 autocast (CUDA), as in mixed-precision training


def step(model: nn.Module, batch: Batch) -> None:
    model.zero_grad(set_to_none=True)
    device = batch[0][0].device.type
    with torch.autocast(device, dtype=torch.float16, enabled=AMP):
        losses = model(*batch)
    sum(losses.values()).backward()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class ReadOnlyClock:
    """Times the read-only pass (``roi_losses``) of one model's RoI heads, and counts its RoIs."""

    def __init__(
        self, heads: SamplingRoIHeads, device: str, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.seconds = 0.0
        self.rois: list[int] = []
        inner = heads.roi_losses

        def timed(features, proposals, *rest):
            sync(device)
            start = clock()
            out = inner(features, proposals, *rest)
            sync(device)
            self.seconds += clock() - start
            self.rois.append(sum(p.shape[0] for p in proposals))
            return out

        heads.roi_losses = timed  # this instance only


def measure_time(args: argparse.Namespace) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per step of every model, and of the read-only pass inside OHEM's steps."""
    models, batch = make_models(args), make_batch(args)
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    clocks = {
        name: ReadOnlyClock(model.roi_heads, args.device, clock)
        for name, model in models.items()
        if isinstance(model.roi_heads, SamplingRoIHeads) and model.roi_heads.sampler.needs_losses
    }
    for model in models.values():  # warm-up
        step(model, batch)
    times: dict[str, list[float]] = {name: [] for name in models}
    read_only: dict[str, list[float]] = {name: [] for name in clocks}
    order = random.Random(0)
    names = list(models)
    for _ in range(args.steps):
        order.shuffle(names)
        for name in names:
            model = models[name]
            if name in clocks:
                clocks[name].seconds = 0.0
            sync(args.device)
            start = clock()
            step(model, batch)
            sync(args.device)
            times[name].append(clock() - start)
            if name in clocks:
                read_only[name].append(clocks[name].seconds)
    for name, read_only_clock in clocks.items():
        per_image = statistics.mean(read_only_clock.rois) / args.batch
        print(f"{name}: the read-only pass scored {per_image:.0f} RoIs per image (proposals + GT)")
    return (
        {name: statistics.median(t) for name, t in times.items()},
        {name: statistics.median(t) for name, t in read_only.items()},
    )


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure_memory_here(args: argparse.Namespace, name: str) -> dict[str, float]:
    """Peak memory of ``name``'s training steps, in this process (see the module docstring)."""
    model, batch = make_models(args)[name], make_batch(args)
    if args.device.startswith("cuda"):
        step(model, batch)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(args.mem_steps):
            step(model, batch)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"peak": peak, "added": peak - base}
    base = _rss_bytes()
    for _ in range(args.mem_steps):
        step(model, batch)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"peak": peak, "added": peak - base}


def measure_memory(args: argparse.Namespace, names: list[str]) -> dict[str, dict[str, float]]:
    """One subprocess per sampler, since a process's peak RSS never goes down."""
    out = {}
    for name in names:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--memory-of", name]
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[name] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="faster_rcnn_tiny")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per sampler")
    parser.add_argument("--mem-steps", type=int, default=3, help="steps per memory measurement")
    parser.add_argument("--batch", type=int, default=2, help="images per batch")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--objects", type=int, default=6, help="ground truths per image")
    parser.add_argument("--num-classes", type=int, default=11)
    parser.add_argument("--proposals", type=int, default=2000, help="RPN proposals per image")
    parser.add_argument("--num", type=int, default=128, help="RoIs per image, every sampler")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument(
        "--samplers",
        nargs="+",
        help="only these rows besides random (torchvision, iou_balanced, overlap, ohem, "
        "ohem@f32, random@512); default: all",
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "thread"],
        default="wall",
        help="wall time, or the calling thread's CPU time (--threads 1 on a loaded CPU)",
    )
    parser.add_argument("--amp", action="store_true", help="float16 autocast (CUDA's AMP)")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global AMP
    AMP = args.amp
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps(measure_memory_here(args, args.memory_of)))
        return

    times, read_only = measure_time(args)
    memory = measure_memory(args, list(times))
    auto = resolve_score_dtype("auto", torch.device(args.device))
    print(
        f"{args.model} on {args.device}: batch {args.batch} x {args.image_size} px, "
        f"{args.proposals} proposals/image, {args.num} RoIs/image, median of {args.steps} steps "
        f"({args.clock} clock); "
        f"ohem scores in {auto or 'float32'}{'; AMP' if args.amp else ''}"
    )
    print(
        f"{'sampler':<14}{'s/step':>9}{'time':>8}{'peak MB':>10}{'peak':>7}{'added MB':>10}"
        f"{'added':>7}"
    )
    ref_t, ref_m = times["random"], memory["random"]
    for name, t in times.items():
        m = memory[name]
        print(
            f"{name:<14}{t:>9.4f}{t / ref_t:>7.3f}x{m['peak'] / 2**20:>10.1f}"
            f"{m['peak'] / ref_m['peak']:>6.3f}x{m['added'] / 2**20:>10.1f}"
            f"{m['added'] / ref_m['added']:>6.3f}x"
        )
    # The read-only pass timed inside the steps: OHEM's own cost, without the noise of two
    # medians' difference. 1 + this is the ratio OHEM would have if nothing else differed.
    for name, t in read_only.items():
        print(f"{name}: read-only pass {t:.4f} s/step = {t / ref_t:.3f} of random's step")


if __name__ == "__main__":
    main()
