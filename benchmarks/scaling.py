"""How every assigner and sampler scales: time and peak memory as candidates and ground truths grow.

Two curves per method, on batches of two images: candidates per image from 500 to 32,000 with 20
ground truths, and ground truths from 1 to 1,000 with 2,000 candidates. Inputs are built as in
``benchmarks/samplers.py`` (70% of the proposals jittered around the ground truths, the rest
anywhere on an 800x1333 image; ATSS gets random anchors of the five pyramid scales, a fifth per
level). Each point is the median of ``--rounds`` calls, the rounds of a method's sizes
interleaved (one call of each size per round); the fitted exponent is the slope of
log(time) against log(size) over the curve (1 is linear; fixed per-call costs pull it below 1 at
small sizes), and the tail exponent the same over the three largest sizes, where those costs no
longer hide a superlinear term. Issue 14 asks for at most 1.1 on every curve.

Peak memory is what one call adds to the process's resident set at its highest (Linux:
``VmHWM`` after resetting it through ``/proc/self/clear_refs``, with the allocator's free memory
handed back first, so freed pages from earlier calls do not hide new ones). On CUDA it is
``torch.cuda.max_memory_allocated`` above what was allocated before the call.

    python benchmarks/scaling.py [--threads 1] [--rounds 5] [--device cpu] [--clock wall]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from hardmine.assign import assign_atss, assign_max_iou
from hardmine.sample import sample_iou_balanced, sample_ohem, sample_overlap, sample_random

IMAGE_H, IMAGE_W = 800, 1333
NUM_IMAGES = 2
CANDIDATES = [500, 1000, 2000, 4000, 8000, 16000, 32000]
GROUND_TRUTHS = [1, 3, 10, 30, 100, 300, 1000]
FIXED_CANDIDATES, FIXED_GROUND_TRUTHS = 2000, 20
ANCHOR_SIZES = (64, 128, 256, 512, 1024)  # scale 8 at strides 8-128, as in the ATSS paper


def _boxes(n: int, g: torch.Generator, size: tuple[float, float] = (16.0, 316.0)) -> Tensor:
    wh = torch.rand(n, 2, generator=g) * (size[1] - size[0]) + size[0]
    xy = torch.rand(n, 2, generator=g) * torch.tensor([IMAGE_W, IMAGE_H]) - wh / 2
    return torch.cat([xy, xy + wh], dim=1)


def _around(gt: Tensor, n: int, g: torch.Generator) -> Tensor:
    near = int(n * 0.7)
    src = gt[torch.randint(len(gt), (near,), generator=g)]
    wh = (src[:, 2:] - src[:, :2]).repeat(1, 2)
    jitter = (torch.rand(near, 4, generator=g) - 0.5) * wh * 0.8
    return torch.cat([src + jitter, _boxes(n - near, g)])


def _anchors(n: int, g: torch.Generator) -> tuple[Tensor, list[int]]:
    per_level = [n // len(ANCHOR_SIZES)] * len(ANCHOR_SIZES)
    per_level[0] += n - sum(per_level)
    levels = [_boxes(k, g, (s, s + 1e-3)) for k, s in zip(per_level, ANCHOR_SIZES, strict=True)]
    return torch.cat(levels), per_level


def calls(num_candidates: int, num_gt: int, device: torch.device) -> dict[str, Callable]:
    """Every method on one batch of ``NUM_IMAGES`` images of the given sizes."""
    g = torch.Generator().manual_seed(0)
    gts = [_boxes(num_gt, g) for _ in range(NUM_IMAGES)]
    labels = [torch.randint(1, 81, (num_gt,), generator=g) for _ in gts]
    proposals = [_around(gt, num_candidates, g) for gt in gts]
    losses = [torch.rand(num_candidates, generator=g).pow(3) * 4 for _ in gts]
    anchors, per_level = _anchors(num_candidates, g)
    gts, labels, proposals, losses = (
        [t.to(device) for t in ts] for ts in (gts, labels, proposals, losses)
    )
    anchors = anchors.to(device)
    assigned = assign_max_iou(proposals, gts, labels)
    gen = torch.Generator(device=device).manual_seed(0)
    return {
        "max-IoU assign": lambda: assign_max_iou(proposals, gts, labels),
        "ATSS assign": lambda: assign_atss(
            [anchors] * NUM_IMAGES, gts, labels, num_per_level=per_level
        ),
        "random sample": lambda: sample_random(assigned, generator=gen),
        "IoU-balanced sample": lambda: sample_iou_balanced(assigned, generator=gen),
        "overlap sample (soft)": lambda: sample_overlap(proposals, assigned, generator=gen),
        "OHEM sample": lambda: sample_ohem(proposals, assigned, losses),
    }


class PeakMemory:
    """What a call adds to the process's memory at its highest (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.trim = None
        with contextlib.suppress(OSError):  # not glibc: freed pages may hide new ones
            self.trim = ctypes.CDLL("libc.so.6").malloc_trim
        self.available = device.type == "cuda" or Path("/proc/self/clear_refs").exists()

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def __call__(self, fn: Callable[[], object]) -> float:
        """Bytes, or NaN where it cannot be measured."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            return float(torch.cuda.max_memory_allocated() - base)
        if not self.available:
            return float("nan")
        if self.trim is not None:
            self.trim(0)
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.available = False
            return float("nan")
        base = self._status("VmRSS")
        fn()
        return float(max(self._status("VmHWM") - base, 0))


def exponent(sizes: list[int], times: list[float]) -> float:
    """Least-squares slope of log(time) on log(size)."""
    xs, ys = [math.log(s) for s in sizes], [math.log(t) for t in times]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per point")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall")
    parser.add_argument("--methods", nargs="+", help="only these (names as printed)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    known = list(calls(1, 1, device))
    if args.methods and (unknown := [m for m in args.methods if m not in known]):
        parser.error(f"--methods: unknown {unknown}; the names are {known}")
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    peak = PeakMemory(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def measure(fns: list[Callable[[], object]]) -> list[tuple[float, float]]:
        """Median time and peak memory of each call, the rounds interleaved across the calls: a
        burst of load on the shared machine then hits every size alike, instead of bending the
        curve (and its tail exponent) where it falls."""
        for fn in fns:
            fn()  # warm-up
        times: list[list[float]] = [[] for _ in fns]
        for _ in range(args.rounds):
            for fn, spent in zip(fns, times, strict=True):
                sync()
                start = clock()
                fn()
                sync()
                spent.append(clock() - start)
        return [(statistics.median(t), peak(fn)) for fn, t in zip(fns, times, strict=True)]

    print(
        f"torch {torch.__version__}, device {device}, {args.threads} thread(s), {args.clock} "
        f"clock, {NUM_IMAGES} images per call, median of {args.rounds}; ms per call, peak MB "
        "added per call"
    )
    curves = [
        ("candidates", CANDIDATES, lambda n: (n, FIXED_GROUND_TRUTHS)),
        ("ground truths", GROUND_TRUTHS, lambda n: (FIXED_CANDIDATES, n)),
    ]
    summary = []
    for label, sizes, shape in curves:
        by_method: dict[str, list[Callable[[], object]]] = {}
        for size in sizes:
            for name, fn in calls(*shape(size), device).items():
                if not args.methods or name in args.methods:
                    by_method.setdefault(name, []).append(fn)
        results = {name: measure(fns) for name, fns in by_method.items()}
        fixed = "20 ground truths" if label == "candidates" else "2000 candidates"
        print(f"\n{label} per image ({fixed}):")
        print(
            f"{'method':<24}" + "".join(f"{s:>10}" for s in sizes) + f"{'exponent':>10}{'tail':>6}"
        )
        for name, points in results.items():
            times = [t for t, _ in points]
            slope, tail = exponent(sizes, times), exponent(sizes[-3:], times[-3:])
            summary.append((name, label, slope))
            summary.append((name, label + " (tail)", tail))
            print(
                f"{name + ' ms':<24}"
                + "".join(f"{1e3 * t:>10.3f}" for t in times)
                + f"{slope:>10.2f}{tail:>6.2f}"
            )
            print(f"{'   peak MB':<24}" + "".join(f"{m / 2**20:>10.1f}" for _, m in points))
    worst = max(summary, key=lambda s: s[2])
    print(
        f"\nlargest exponent: {worst[2]:.2f} ({worst[0]}, over {worst[1]}); issue 14's bound 1.1: "
        + ("met" if worst[2] <= 1.1 else "NOT met")
    )


if __name__ == "__main__":
    main()
