"""The checks of issue 14 that need a GPU, in one script; without CUDA it says so and exits 0.

1. Host synchronisation: every assigner and sampler runs on a CUDA batch under
   ``torch.cuda.set_sync_debug_mode("error")`` (after a warm-up outside it): each passes, or the
   first synchronising call is named. Then under ``"warn"`` every synchronising call site is
   listed, marked where it is input validation (a finiteness check), the one kind allowed.
2. Milliseconds per image on CUDA beside torchvision's (on CUDA too), at B = 2 and 16: the table
   of ``benchmarks/samplers.py`` (MMDetection left out: its classes are timed on the CPU).
3. The R50-FPN OHEM training step as a ratio to random sampling's, with AMP (float16 autocast):
   ``benchmarks/train_step.py --device cuda --model faster_rcnn_r50_fpn --image-size 800 --amp``.

    python benchmarks/gpu_check.py [--rounds 15] [--steps 10] [--skip-train-step]

Every part prints as it finishes, so a run cut short still reports what it reached.
"""

from __future__ import annotations

import argparse
import linecache
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

import samplers as bench
from hardmine.assign import ASSIGNERS, assign_atss, assign_max_iou
from hardmine.sample import SAMPLERS, MinedNegativeSampler, OverlapSampler

HERE = Path(__file__).resolve().parent


def _site(filename: str, lineno: int) -> str:
    """``path:line  code`` with the path from the repository root where it lies inside it."""
    path = Path(filename)
    root = HERE.parent
    shown = path.relative_to(root) if path.is_relative_to(root) else path
    code = linecache.getline(filename, lineno).strip()
    kind = "  [input validation]" if "isfinite" in code else ""
    return f"{shown}:{lineno}  {code}{kind}"


def sync_free_calls(batch: bench.Batch) -> dict[str, Callable[[], object]]:
    """Every assigner and sampler (each registered one with its defaults, and the variants)."""
    device = batch.anchors.device
    gen = torch.Generator(device=device).manual_seed(0)
    size = len(batch.gt_boxes)
    anchors = [batch.anchors] * size
    # Ignore regions: the first ground truth of each image, as a crowd box.
    ignore = [g[:1] for g in batch.gt_boxes]
    assigned = assign_max_iou(batch.proposals, batch.gt_boxes, batch.gt_labels)
    mined = [torch.rand(p.shape[0], device=device) < 0.05 for p in batch.proposals]
    calls: dict[str, Callable[[], object]] = {}
    for name, cls in ASSIGNERS.items():
        assigner = cls()
        candidates = anchors if name == "atss" else batch.proposals
        for tag, extra in [("", {}), (" + ignore", {"ignore_boxes": ignore})]:
            calls[f"assign {name}{tag}"] = lambda a=assigner, c=candidates, e=extra: a(
                c, batch.gt_boxes, batch.gt_labels, num_per_level=batch.num_per_level, **e
            )
    calls["assign max_iou, low quality"] = lambda: assign_max_iou(
        batch.proposals, batch.gt_boxes, batch.gt_labels, low_quality=True
    )
    calls["assign atss, half precision"] = lambda: assign_atss(
        [a.half() for a in anchors],
        [g.half() for g in batch.gt_boxes],
        batch.gt_labels,
        num_per_level=batch.num_per_level,
    )
    samplers = {name: cls() for name, cls in SAMPLERS.items()}
    for strategy in ("uniform", "hard", "linear"):
        samplers[f"overlap {strategy}"] = OverlapSampler(strategy=strategy)
    samplers["random + mined"] = MinedNegativeSampler(SAMPLERS["random"]())
    for name, sampler in samplers.items():
        extra = {"mined": mined} if "mined" in name else {}
        calls[f"sample {name}"] = lambda s=sampler, e=extra: s(
            batch.proposals, assigned, losses=batch.losses, generator=gen, **e
        )
    return calls


def check_syncs(batch: bench.Batch) -> None:
    print("\n== 1. host synchronisation (torch.cuda.set_sync_debug_mode) ==")
    for name, call in sync_free_calls(batch).items():
        call()  # warm-up: lazy initialisation is not the method's
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            call()
            verdict = "no host sync"
        except RuntimeError as error:
            verdict = f"SYNCS: {str(error).splitlines()[0]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        torch.cuda.set_sync_debug_mode("default")
        sites = sorted(
            {_site(w.filename, w.lineno) for w in caught if "synchroniz" in str(w.message)}
        )
        print(f"{name:<34}{verdict}")
        for site in sites:
            print(f"    {site}")


def timings(rounds: int) -> None:
    print("\n== 2. ms per image on CUDA, beside torchvision's on CUDA ==")
    device = torch.device("cuda")
    header = f"{'method':<28}{'B':>4}{'hardmine':>10}  {'baseline':<32}{'ms':>9}{'ratio':>8}"
    print(header)
    for size in (2, 16):
        b = bench.to_device(bench.make_batch(size), device)
        for row in bench.contenders_for(b, device, None):
            calls = {"ours": row.ours} | {name: fn for name, (fn, _) in row.baselines.items()}
            try:
                t = bench.race(calls, rounds, device)
            except RuntimeError as error:  # one broken contender leaves the others' rows
                print(f"{row.name:<28}{size:>4}  FAILED: {str(error).splitlines()[0]}")
                continue
            ours = t["ours"] * 1e3 / size
            for name in row.baselines:
                base = t[name] * 1e3 / size
                print(
                    f"{row.name:<28}{size:>4}{ours:>10.3f}  {name:<32}{base:>9.3f}"
                    f"{base / ours:>7.2f}x"
                )


def train_step(steps: int) -> None:
    print("\n== 3. R50-FPN OHEM step with AMP, as a ratio to random sampling's ==", flush=True)
    cmd = [
        sys.executable,
        str(HERE / "train_step.py"),
        "--device",
        "cuda",
        "--model",
        "faster_rcnn_r50_fpn",
        "--image-size",
        "800",
        "--amp",
        "--steps",
        str(steps),
        "--samplers",
        "torchvision",
        "ohem",
        "ohem@f32",
        "random@512",
    ]
    print(" ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per contender")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per sampler")
    parser.add_argument("--skip-train-step", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing checked (run it where a GPU is).")
        return
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    check_syncs(bench.to_device(bench.make_batch(2), torch.device("cuda")))
    timings(args.rounds)
    if not args.skip_train_step:
        train_step(args.steps)


if __name__ == "__main__":
    main()
