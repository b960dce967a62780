"""The ``hardmine`` command: ``train``, ``eval``, ``compare``, ``inspect``, ``mine`` and
``bootstrap``.

Each subcommand is a parser function (``<name>_parser``, listed in ``PARSERS``) that registers
its options and sets two defaults: ``command``, the function to run (``(args, overrides) -> exit
status``), and ``takes_overrides``, whether dotted configuration overrides (``--train.lr 0.01``)
may follow.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

import torch

from hardmine.config import (
    COMPONENT_SECTIONS,
    ConfigError,
    RunConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    parse_overrides,
)
from hardmine.engine.build import RUN_REGISTRIES, load_run_config
from hardmine.engine.distributed import resolve_device
from hardmine.engine.evaluate import evaluate_run
from hardmine.engine.rundir import load_run
from hardmine.engine.train import NonFiniteLossError, train
from hardmine.mine import bootstrap, format_rounds, mine_run
from hardmine.models import build
from hardmine.report.compare import (
    DEFAULT_METHODS,
    default_compare_base,
    describe,
    format_table,
    run_comparison,
    summarize,
    write_report,
)
from hardmine.report.inspect import DEFAULT_MODEL, inspect_picks, load_data, samplers_for
from hardmine.sample import SAMPLERS

Subparsers = Any  # argparse's private _SubParsersAction


def _wrap(text: str) -> str:
    """A paragraph wrapped for the raw help formatter, which keeps the epilog's layout."""
    return textwrap.fill(text, width=80)


_OVERRIDES_HELP = """\
configuration overrides:
  Any key of the configuration can follow as --section.key VALUE (or --section.key=VALUE); values
  are read as YAML. Sections: model, sampler, assigner (each a name plus that class's settings),
  data, train, and the top-level keys seed, device, output_dir. Examples:
    --sampler.name ohem --sampler.num 256 --train.epochs 3 --train.lr 0.01 --device cpu
  An unknown key is an error that lists the valid ones.
"""


def train_parser(subparsers: Subparsers) -> None:
    """``hardmine train``."""
    parser = subparsers.add_parser(
        "train",
        help="train one detector with one sampler / assigner",
        description=_wrap(
            "Train one detector with one sampler and assigner, in a run directory (config.yaml, "
            "metrics.jsonl, checkpoint.pt, results.json, plots/, tensorboard/). Under torchrun "
            "it trains with DDP, one process per device."
        ),
        epilog=_OVERRIDES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config",
        metavar="YAML",
        help="the run configuration (configs/*.yaml, or a run's config.yaml); defaults otherwise",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in output_dir from its last checkpoint (start afresh if it has "
        "none); without it, an output_dir holding a checkpoint is an error",
    )
    parser.add_argument(
        "--hard-negatives",
        metavar="FILE",
        help="a hard-negatives file (hardmine mine): its boxes join the RoI candidates as "
        "background, with a guaranteed share of the negative picks (hard_negative_share, "
        "default 0.25)",
    )
    parser.set_defaults(command=train_command, takes_overrides=True)


def train_command(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    if args.hard_negatives is not None:
        overrides = overrides | {"hard_negatives": args.hard_negatives}
    config = load_run_config(args.config, overrides)
    try:
        result = train(config, resume=args.resume)
    except (NonFiniteLossError, FileExistsError) as error:
        print(f"hardmine train: {error}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{result.run_dir}: " + _format_metrics(result.metrics))
    return 0


def eval_parser(subparsers: Subparsers) -> None:
    """``hardmine eval``."""
    parser = subparsers.add_parser(
        "eval",
        help="COCO AP of a run's checkpoint",
        description="Evaluate a run's latest checkpoint on the validation set of its "
        "configuration (COCO AP by faster-coco-eval); writes eval.json in the run directory.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--run", required=True, metavar="DIR", help="the run directory (made by hardmine train)"
    )
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA when available), cpu or cuda (default: auto)"
    )
    parser.set_defaults(command=eval_command, takes_overrides=False)


def eval_command(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    print(f"{args.run}: " + _format_metrics(evaluate_run(args.run, device=args.device)))
    return 0


def compare_parser(subparsers: Subparsers) -> None:
    """``hardmine compare``."""
    names = ", ".join(m.name for m in DEFAULT_METHODS)
    parser = subparsers.add_parser(
        "compare",
        help="train one detector with several samplers (and seeds) and write a report",
        description=_wrap(
            "Train the same detector with each sampler (random, OHEM, IoU-balanced, overlap on "
            "the tiny Faster R-CNN) and RetinaNet with ATSS beside max-IoU, over seeds; write "
            "OUTPUT/report.md (AP / AP50 / AP75 mean ± std, the difference to the baseline paired "
            "by seed with its 95 % interval and a verdict, where the AP goes by error type, what "
            "each sampler picks) with its figures, and print the table. Each run has its own "
            "directory "
            "OUTPUT/<method>/seed<k>: rerunning skips finished runs and resumes interrupted "
            "ones; a failed run is reported without stopping the others."
        ),
        epilog=_OVERRIDES_HELP
        + "  In compare they apply to every run; those of model, sampler and assigner to the\n"
        "  methods that have that section (--sampler.num 256 leaves RetinaNet alone).\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config",
        metavar="YAML",
        help="base run configuration; the methods replace its model, sampler and assigner "
        "(default: the built-in scenes and a short schedule, about 15 minutes for 3 seeds on "
        "two quiet CPU cores)",
    )
    parser.add_argument(
        "--methods",
        metavar="A,B",
        help=f"comma-separated subset of the methods (default: all of {names})",
    )
    parser.add_argument(
        "--seeds", type=int, default=3, metavar="N", help="seeds 0..N-1 per method (default: 3)"
    )
    parser.add_argument("--epochs", type=int, metavar="E", help="epochs per run (train.epochs)")
    _add_data_option(parser, "COCO data instead of the scenes")
    parser.add_argument(
        "--output",
        default="runs/compare",
        metavar="DIR",
        help="folder of the runs and the report (default: runs/compare)",
    )
    parser.set_defaults(command=compare_command, takes_overrides=True)


def compare_command(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    by_name = {m.name: m for m in DEFAULT_METHODS}
    methods = list(DEFAULT_METHODS)
    if args.methods:
        unknown = [n for n in args.methods.split(",") if n not in by_name]
        if unknown:
            raise ConfigError(f"unknown methods {unknown}; valid: {', '.join(by_name)}")
        methods = [by_name[n] for n in args.methods.split(",")]
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {args.seeds}")
    # The methods set the model, sampler and assigner: overrides of those go to every method.
    per_method = {k: v for k, v in overrides.items() if k.split(".")[0] in COMPONENT_SECTIONS}
    overrides = {k: v for k, v in overrides.items() if k not in per_method}
    base = _base_config(args, overrides)
    seeds = list(range(args.seeds))
    outcomes = run_comparison(base, methods, seeds, args.output, overrides=per_method)
    report = write_report(args.output, methods, outcomes, description=_describe(base, seeds))
    print(format_table(summarize(methods, outcomes)))
    print(f"\nreport: {report}")
    return 0 if all(o.error is None for o in outcomes) else 1


def _add_data_option(parser: argparse.ArgumentParser, what: str) -> None:
    """``--data``: a COCO dataset as four paths, or one folder in the PennFudan layout."""
    parser.add_argument(
        "--data",
        nargs="+",
        metavar="PATH",
        help=f"{what}: TRAIN_IMAGES TRAIN_ANN VAL_IMAGES VAL_ANN, or one folder in the PennFudan "
        "layout (PNGImages/, annotations.json; the last 50 images by name are validation)",
    )


def _add_mining_options(parser: argparse.ArgumentParser) -> None:
    """The options that say which false positives are mined, shared by mine and bootstrap."""
    parser.add_argument(
        "--top-k",
        type=int,
        metavar="K",
        help="keep at most K false positives per image, the highest-scoring (default: all)",
    )
    parser.add_argument(
        "--score-thr",
        type=float,
        metavar="S",
        help="keep only false positives scoring at least S (default: all the detector outputs)",
    )
    parser.add_argument(
        "--iou-thr",
        type=float,
        default=0.5,
        metavar="T",
        help="a detection overlapping a ground truth of any class by IoU >= T is not a false "
        "positive (default: 0.5)",
    )


def mine_parser(subparsers: Subparsers) -> None:
    """``hardmine mine``."""
    parser = subparsers.add_parser(
        "mine",
        help="write a trained run's false positives on its training images (hard negatives)",
        description=_wrap(
            "Run a trained detector over its training images and write its false positives "
            "(detections whose IoU with every ground truth of their image is below --iou-thr, "
            "outside ignore regions) with their scores to a hard-negatives JSON file, one entry "
            "per image. Train with them by 'hardmine train --hard-negatives FILE'."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--run", required=True, metavar="DIR", help="the run directory (made by hardmine train)"
    )
    _add_data_option(parser, "COCO data to mine instead of the run's (its training images)")
    parser.add_argument(
        "--output", metavar="FILE", help="the file to write (default: DIR/hard_negatives.json)"
    )
    _add_mining_options(parser)
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA when available), cpu or cuda (default: auto)"
    )
    parser.set_defaults(command=mine_command, takes_overrides=False)


def mine_command(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    path, mined = mine_run(
        args.run,
        output=args.output,
        device=args.device,
        overrides=_data_overrides(args.data) if args.data else None,
        iou_thr=args.iou_thr,
        top_k=args.top_k,
        score_thr=args.score_thr,
    )
    print(f"{path}: {mined.num_boxes} false positives on {len(mined.images)} images")
    return 0


def bootstrap_parser(subparsers: Subparsers) -> None:
    """``hardmine bootstrap``."""
    parser = subparsers.add_parser(
        "bootstrap",
        help="alternate train -> mine -> train, and report AP and false positives per round",
        description=_wrap(
            "Bootstrapping: train (round 0), mine the detector's false positives on the "
            "training images, train afresh with them as extra background RoIs, and so on for "
            "--rounds trainings, in OUTPUT/round<r>. Writes OUTPUT/bootstrap.md (AP, AP50 and "
            "false positives per validation image at a fixed recall, per round) and prints the "
            "table. Rerunning skips finished rounds and resumes interrupted ones."
        ),
        epilog=_OVERRIDES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config",
        metavar="YAML",
        help="the run configuration of every round (default: the default comparison's random "
        "run: tiny Faster R-CNN, 128 RoIs per image, built-in scenes)",
    )
    parser.add_argument(
        "--rounds", type=int, default=2, metavar="R", help="trainings in all (default: 2)"
    )
    parser.add_argument("--epochs", type=int, metavar="E", help="epochs per round (train.epochs)")
    _add_data_option(parser, "COCO data instead of the scenes")
    parser.add_argument(
        "--output",
        default="runs/bootstrap",
        metavar="DIR",
        help="folder of the rounds and the report (default: runs/bootstrap)",
    )
    _add_mining_options(parser)
    parser.add_argument(
        "--share",
        type=float,
        default=0.25,
        metavar="F",
        help="fraction of the negative picks guaranteed to mined boxes (default: 0.25)",
    )
    parser.add_argument(
        "--recall",
        type=float,
        default=0.5,
        metavar="R",
        help="the recall at which false positives per image are reported (default: 0.5)",
    )
    parser.set_defaults(command=bootstrap_command, takes_overrides=True)


def bootstrap_command(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    if args.rounds < 1:
        raise ConfigError(f"--rounds must be at least 1, got {args.rounds}")
    if not args.config:  # every round is then the default comparison's random-sampling run
        overrides = {"sampler": {"name": "random", "num": 128}} | overrides
    results = bootstrap(
        _base_config(args, overrides),
        rounds=args.rounds,
        output_dir=args.output,
        iou_thr=args.iou_thr,
        top_k=args.top_k,
        score_thr=args.score_thr,
        share=args.share,
        recall=args.recall,
    )
    print(format_rounds(results, recall=args.recall))
    return 0


def _base_config(args: argparse.Namespace, overrides: dict[str, Any]) -> RunConfig:
    """The configuration that ``--config``, ``--epochs``, ``--data`` and ``overrides`` describe.

    Without ``--config`` it is the default comparison's base: built-in scenes, a short CPU
    schedule.
    """
    overrides = dict(overrides)
    if args.epochs is not None:
        overrides["train.epochs"] = args.epochs
    if args.data:
        overrides |= _data_overrides(args.data)
    if args.config:
        return load_run_config(args.config, overrides)
    return config_from_dict(
        apply_overrides(config_to_dict(default_compare_base()), overrides),
        registries=RUN_REGISTRIES,
    )


def _data_overrides(paths: Sequence[str]) -> dict[str, Any]:
    if len(paths) == 1:
        return {"data.kind": "coco", "data.root": paths[0]}
    if len(paths) == 4:
        keys = ("train_images", "train_ann", "val_images", "val_ann")
        return {"data.kind": "coco"} | {f"data.{k}": p for k, p in zip(keys, paths, strict=True)}
    raise ConfigError(f"--data takes 1 folder or 4 paths, got {len(paths)}")


def _describe(config: RunConfig, seeds: Sequence[int]) -> str:
    return describe(config, seeds)


def _format_metrics(metrics: dict[str, float]) -> str:
    if not metrics:
        return "finished (no evaluation)"
    return "  ".join(f"{k} {100 * v:.1f}" for k, v in metrics.items())


def inspect_parser(subparsers: Subparsers) -> None:
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
        run = load_run(args.run, device=device)
        model, dataset = run.model, run.train_set
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


# One entry per subcommand; a new subcommand is one parser function and its command function.
PARSERS: tuple[Callable[[Subparsers], None], ...] = (
    train_parser,
    eval_parser,
    compare_parser,
    inspect_parser,
    mine_parser,
    bootstrap_parser,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``hardmine`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="hardmine",
        description="Sample selection for object-detector training: train detectors with OHEM, "
        "IoU-balanced, overlap or random sampling and ATSS or max-IoU assignment, evaluate them "
        "(COCO AP), compare them, see what each sampler picks, and mine hard negatives offline "
        "(bootstrapping). Run 'hardmine COMMAND --help' for a command's options.",
        allow_abbrev=False,
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for add in PARSERS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hardmine`` with ``argv`` (``sys.argv[1:]`` by default); returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(format="%(message)s")
    logging.getLogger("hardmine").setLevel(logging.INFO)  # our progress lines only
    try:
        if extra and not args.takes_overrides:
            raise ConfigError(f"unrecognised arguments: {' '.join(extra)}")
        return args.command(args, parse_overrides(extra))
    except ConfigError as error:
        parser.exit(2, f"hardmine: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
