"""The ``hardmine`` command: ``train``, ``eval``, ``compare``, ``inspect``, ``mine`` and
``bootstrap``.

Each subcommand is a parser function (``<name>_parser``, listed in ``PARSERS``) that registers
its options and sets two defaults: ``command``, the function to run (``(args, overrides) -> exit
status``), and ``takes_overrides``, whether dotted configuration overrides (``--train.lr 0.01``)
may follow.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import logging
import math
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from hardmine.errors import ConfigError, HardmineError

if TYPE_CHECKING:
    from hardmine.config import RunConfig

# Building the parser imports neither torch nor anything that does (``hardmine --help`` answers
# at once): each command imports what it runs. The names the help texts list are stated here;
# tests/test_cli.py checks them against the registries.
SAMPLER_NAMES = ("random", "ohem", "iou_balanced", "overlap", "pisa")  # hardmine.sample.SAMPLERS
METHOD_NAMES = (  # hardmine.report.compare.DEFAULT_METHODS
    "random",
    "ohem",
    "iou_balanced",
    "overlap",
    "retinanet_max_iou",
    "retinanet_atss",
)
PRESET_NAMES = (  # hardmine.report.methods.PRESETS
    "frcn",
    "frcn_bg0",
    "frcn_no_ratio",
    "ohem_paper",
    "overlap_neg",
    "overlap_pos",
    "overlap_neg_best",
    "overlap_pos_best",
    "overlap_best",
    "pisa",
)
INSPECT_MODEL = "faster_rcnn_tiny"  # hardmine.report.inspect.DEFAULT_MODEL

Subparsers = Any  # argparse's private _SubParsersAction


class Parser(argparse.ArgumentParser):
    """argparse's parser with its errors on one line (the usage is a --help away), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _wrap(text: str) -> str:
    """A paragraph wrapped for the raw help formatter, which keeps the epilog's layout."""
    return textwrap.fill(text, width=80)


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def _jobs(text: str) -> int | str:
    """An argparse type for ``--jobs``: ``auto`` or an integer of at least 1."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return _int_at_least(1)(text)
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"{error} (or 'auto')") from None


def _number_in(
    low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> Callable[[str], float]:
    """An argparse type: a number in ``[low, high]`` (``(low`` with ``low_open``, ``high)``
    with ``high_open``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        above = low < value if low_open else low <= value
        below = value < high if high_open else value <= high
        if not (above and below):  # NaN fails both
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value

    return parse


def _names(valid: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated list of distinct names out of ``valid``."""

    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",")]
        if not text.strip() or "" in names:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated names out of {', '.join(valid)}; got {text!r}"
            )
        unknown = [n for n in names if n not in valid]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown)}; valid: {', '.join(valid)}"
            )
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise argparse.ArgumentTypeError(f"{', '.join(repeated)} given more than once")
        return names

    return parse


def _specs(text: str) -> str:
    """An argparse type: ``--methods`` as given, refused when it names no method at all.

    The specs themselves (names, presets, variants, each once) are read by the command
    (``hardmine.report.methods.parse_methods``), which needs the registries.
    """
    if not text.strip() or not any(part.strip() for part in text.split(",")):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated methods, e.g. random,ohem; got {text!r}"
        )
    return text


_OVERRIDES_HELP = """\
configuration overrides:
  Any key of the configuration can follow as --section.key VALUE (or --section.key=VALUE); values
  are read as YAML. Sections: model, sampler, assigner (each a name plus that class's settings),
  data, train, and the top-level keys seed, device, output_dir. Examples:
    --sampler.name ohem --sampler.num 256 --train.epochs 3 --train.lr 0.01 --device cpu
  A component's settings belong to its class: give its name with them where the
  configuration names none (--assigner.name max_iou --assigner.pos_thr 0.4); another name
  starts the section from that class's defaults. An unknown key is an error that lists the
  valid ones.
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
        "default 0.25); a file mined on a folder (hardmine mine --images) goes with that "
        "folder as --negative-images",
    )
    _add_negative_image_options(parser)
    parser.set_defaults(command=train_command, takes_overrides=True)


def _add_negative_image_options(parser: argparse.ArgumentParser) -> None:
    """A folder of images without objects to train with (train and bootstrap)."""
    parser.add_argument(
        "--negative-images",
        metavar="FOLDER",
        help="a folder of images that hold none of the classes (searched recursively; jpg, png, "
        "bmp, gif, tiff, webp, ppm): they join the training set as images without objects "
        "(negative_images)",
    )
    parser.add_argument(
        "--negative-image-share",
        type=_share_below_one,
        metavar="F",
        help="fraction of each epoch's training images taken from --negative-images, in [0, 1) "
        "(negative_image_share; default 0.25: one folder image for every three others)",
    )


def _share_below_one(text: str) -> float:
    """An argparse type: a number in ``[0, 1)``."""
    return _number_in(0, 1, high_open=True)(text)


def _negative_image_overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.negative_images is not None:
        out["negative_images"] = args.negative_images
    if args.negative_image_share is not None:
        out["negative_image_share"] = args.negative_image_share
    return out


def train_command(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from hardmine.engine.build import load_run_config
    from hardmine.engine.checkpoint import CHECKPOINT_NAME
    from hardmine.engine.train import train

    if args.hard_negatives is not None:
        overrides = overrides | {"hard_negatives": args.hard_negatives}
    overrides = overrides | _negative_image_overrides(args)
    if args.resume and args.config and "output_dir" not in overrides:
        # A run's own config.yaml names its run: the folder it is in, wherever that now is.
        folder = Path(args.config).parent
        if (folder / CHECKPOINT_NAME).exists():
            overrides = overrides | {"output_dir": str(folder)}
    config = load_run_config(args.config, overrides)
    if "negative_image_share" in overrides and config.negative_images is None:
        # S15: it was silently ignored; --negative-val is refused alike (bootstrap).
        raise ConfigError(
            "--negative-image-share: only with --negative-images FOLDER (or a config that "
            "names negative_images)"
        )
    if int(os.environ.get("RANK", "0")) == 0:  # one process of a torchrun holds the run
        from hardmine._atomic import check_writable, hold_folder

        check_writable(config.output_dir, f"output_dir {config.output_dir}")
        holding = hold_folder(
            config.output_dir, f"output_dir {config.output_dir}", "hardmine train or compare"
        )
    else:
        holding = contextlib.nullcontext()
    with holding:  # two trainings of one run would append to each other's files
        result = train(config, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        done = " (finished before)" if result.finished_before else ""
        print(f"{result.run_dir}{done}: " + _format_metrics(result.metrics))
    return 0


def eval_parser(subparsers: Subparsers) -> None:
    """``hardmine eval``."""
    parser = subparsers.add_parser(
        "eval",
        help="COCO AP of a run's checkpoint",
        description=_wrap(
            "Evaluate a run's latest checkpoint on the validation set of its configuration "
            "(COCO AP by faster-coco-eval); writes eval.json in the run directory."
        ),
        epilog="inference overrides:\n"
        "  Inference settings of the model (model.* other than model.name) and the data\n"
        "  (data.*) can follow as --section.key VALUE, without retraining; the result goes to\n"
        "  eval_<key>=<value>.json beside eval.json. Training settings (model.box_loss_beta,\n"
        "  model.score_dtype, model.*_train, data.num_train, ...) are refused: evaluation does\n"
        "  not read them. The Overlap Sampler paper's Table 2(c):\n"
        "    hardmine eval --run DIR --model.box_nms_thresh 0.55\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--run", required=True, metavar="DIR", help="the run directory (made by hardmine train)"
    )
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA when available), cpu or cuda (default: auto)"
    )
    parser.set_defaults(command=eval_command, takes_overrides=True)


def eval_command(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from hardmine.engine.evaluate import evaluate_run

    metrics = evaluate_run(args.run, device=args.device, overrides=overrides)
    print(f"{args.run}: " + _format_metrics(metrics))
    return 0


def compare_parser(subparsers: Subparsers) -> None:
    """``hardmine compare``."""
    names = ", ".join(METHOD_NAMES)
    presets = textwrap.fill(
        ", ".join(PRESET_NAMES), width=80, initial_indent="    ", subsequent_indent="    "
    )
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
        "  methods that have that section (--sampler.num 256 leaves RetinaNet alone).\n"
        "\nmethods:\n"
        "  --methods takes names and variants NAME:KEY=VALUE[:KEY=VALUE...]: a bare KEY is a\n"
        "  setting of the method's sampler (or assigner), a dotted one a key of the run that\n"
        "  keeps the comparison fair: sampler.*, assigner.* (of a method that has one),\n"
        "  model.* but model.name, train.*, data.batch_size, hard_negatives. Another detector\n"
        "  or other data (model.name, data.kind, data.num_classes, ...) is refused: give it\n"
        "  to every method as --KEY VALUE. Each key once per variant. Each variant is its own\n"
        "  row, named as written, paired by seed with its method's baseline. For example:\n"
        "    --methods random,overlap,overlap:strategy=hard,overlap:pos_strategy=soft:epsilon=2\n"
        f"  The default methods: {names}.\n"
        "  The papers' presets (README, 'The papers' ablations'):\n"
        f"{presets}\n"
        "  They train on the comparison's batch size and schedule, as their baselines do; the\n"
        "  papers' own for the whole comparison: OHEM's N = 2 images per step is\n"
        "  --data.batch_size 2, the Overlap paper's Detectron 1x is\n"
        "  --train.decay_at '[0.666667, 0.888889]'.\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config",
        metavar="YAML",
        help="base run configuration; the methods replace its model, sampler and assigner "
        "(default: the built-in scenes and a short schedule: 18 runs of 1-1.5 minutes on a CPU "
        "core; make compare, which adds --jobs auto, took 12.2 minutes on two quiet cores, "
        "about 16 beside another job, 35 at a load of 5)",
    )
    parser.add_argument(
        "--methods",
        type=_specs,
        metavar="A,B",
        help="comma-separated methods, each once: names, presets and variants NAME:KEY=VALUE "
        f"(see below; default: {names})",
    )
    parser.add_argument(
        "--seeds",
        type=_int_at_least(1),
        default=3,
        metavar="N",
        help="seeds 0..N-1 per method (default: 3)",
    )
    parser.add_argument(
        "--epochs",
        type=_int_at_least(1),
        metavar="E",
        help="epochs per run, train.epochs (default: the base configuration's; the built-in "
        "one's is 4); the RetinaNet rows train twice E, their gradients clipped to a 2-norm "
        "of 1 unless --train.grad_clip is given",
    )
    _add_data_option(parser, "COCO data instead of the scenes")
    parser.add_argument(
        "--output",
        default="runs/compare",
        metavar="DIR",
        help="folder of the runs and the report (default: runs/compare)",
    )
    parser.add_argument(
        "--jobs",
        type=_jobs,
        metavar="N",
        help="train N runs at a time, each in a process of its own with the CPU cores divided "
        "among them (default: 1, one after another in this process); 'auto': one run per core, "
        "one thread each, or with --devices one per device entry (what make compare uses: the "
        "tiny models train no faster on two threads than on one, so two cores train two runs of "
        "a minute or more in the time of one; each process's start costs some seconds, which "
        "very short runs do not win back); not used by --plan; the same runs with the "
        "same seeds, bit-identical where each run gets as many threads (on the CPU, --jobs 2 on "
        "2 cores is OMP_NUM_THREADS=1 with --jobs 1; other thread counts differ in the last "
        "digits)",
    )
    parser.add_argument(
        "--devices",
        type=_device_list,
        metavar="0,1,...",
        help="train one run at a time on each of these GPUs (CUDA_VISIBLE_DEVICES per process; "
        "a device named twice takes two runs)",
    )
    parser.add_argument(
        "--plan",
        action="store_true",
        help="train nothing: write the config.yaml of every run not finished yet and print the "
        "command that trains each (to run elsewhere, e.g. under torchrun); rerun without --plan "
        "to write the report",
    )
    parser.set_defaults(command=compare_command, takes_overrides=True)


def _device_list(text: str) -> list[str]:
    """An argparse type: comma-separated GPU indices."""
    devices = [d.strip() for d in text.split(",")]
    if not all(d.isdigit() for d in devices):
        raise argparse.ArgumentTypeError(f"expected GPU indices such as 0,1; got {text!r}")
    return devices


def compare_command(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from hardmine._atomic import check_writable, hold_folder
    from hardmine.config import COMPONENT_SECTIONS
    from hardmine.report.compare import (
        DEFAULT_METHODS,
        REPORT_NAME,
        format_table,
        plan_comparison,
        run_comparison,
        summarize,
        write_report,
    )
    from hardmine.report.methods import check_method, parse_methods

    methods = parse_methods(args.methods) if args.methods else list(DEFAULT_METHODS)
    # The methods set the model, sampler and assigner: overrides of those go to every method.
    per_method = {k: v for k, v in overrides.items() if k.split(".")[0] in COMPONENT_SECTIONS}
    overrides = {k: v for k, v in overrides.items() if k not in per_method}
    check_writable(args.output, f"--output {args.output}")
    base = _base_config(args, overrides)
    for method in methods:  # a bad variant is a user error before any training, not a failed run
        check_method(method, base, overrides=per_method)
        # Its folder too: a name longer than a folder's name may be (255 bytes) failed its runs.
        check_writable(Path(args.output) / method.name, f"--methods {method.name}")
    seeds = list(range(args.seeds))
    slots = None
    if not args.plan:
        from hardmine.engine.distributed import resolve_device

        # Here, not in each run: --device cuda without CUDA, or data that is not there, is one
        # user error, not every run failing (--plan's runs may train on another machine, so
        # neither is checked there).
        resolve_device(base.device)
        _check_data(base)
        slots = _slots(args, base)
    # One comparison in a folder at a time: two would train the same runs into the same files.
    with hold_folder(args.output, f"--output {args.output}", "hardmine compare"):
        if args.plan:
            paths = plan_comparison(base, methods, seeds, args.output, overrides=per_method)
            for path in paths:
                print(f"hardmine train --config {path} --resume")
            print(
                f"\n{len(paths)} runs to train (under torchrun: torchrun --nproc-per-node G -m "
                "hardmine.cli train ...); then rerun this command without --plan for the report"
            )
            return 0
        outcomes = run_comparison(
            base, methods, seeds, args.output, overrides=per_method, slots=slots
        )
        print(format_table(summarize(methods, outcomes)))
        description = _describe(base, seeds, slots)
        report = write_report(args.output, methods, outcomes, description=description, base=base)
    if report is None:  # every run failed: the earlier call's report and plots stay
        print(
            f"\nevery run failed; {Path(args.output) / REPORT_NAME}, of an earlier call, "
            "was left as it was"
        )
    else:
        print(f"\nreport: {report}")
    return 0 if all(o.error is None for o in outcomes) else 1


def _check_data(config: RunConfig) -> None:
    """Raise what training would (``DataError``, ``CocoFormatError``, ``ConfigError``) for data
    files that are missing or unusable, by loading the data sets as each run will."""
    if config.data.kind == "scenes":  # generated: no files
        return
    from hardmine.engine.build import build_datasets

    build_datasets(config)


def _slots(args: argparse.Namespace, base: RunConfig) -> list[Any] | None:
    """The process slots of ``--jobs`` / ``--devices``; None to train here, one run at a time."""
    from hardmine.report.jobs import available_cpus, make_slots

    jobs = args.jobs
    if jobs == "auto":  # one run per core; with --devices, one per device entry
        jobs = None if args.devices is not None else available_cpus()
    if args.devices is None and (jobs is None or jobs == 1):
        return None

    if args.devices is not None:
        import torch

        if base.device == "cpu":
            raise ConfigError("--devices names GPUs, but the runs' device is cpu")
        count = torch.cuda.device_count()
        missing = [d for d in args.devices if int(d) >= count]
        if missing:
            raise ConfigError(
                f"--devices {','.join(args.devices)}: this machine has {count} CUDA device(s); "
                f"no {', '.join(missing)}"
            )
    try:
        return make_slots(jobs, args.devices)
    except ValueError as error:
        raise ConfigError(str(error)) from None


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
        type=_int_at_least(1),
        metavar="K",
        help="keep at most K false positives per image, the highest-scoring (default: all)",
    )
    parser.add_argument(
        "--score-thr",
        type=_number_in(0, 1),
        metavar="S",
        help="keep only false positives scoring at least S, in [0, 1] (default: all the detector "
        "outputs)",
    )
    parser.add_argument(
        "--iou-thr",
        type=_number_in(0, 1),
        default=0.5,
        metavar="T",
        help="a detection overlapping a ground truth of any class by IoU >= T is not a false "
        "positive (default: 0.5)",
    )


def mine_parser(subparsers: Subparsers) -> None:
    """``hardmine mine``."""
    parser = subparsers.add_parser(
        "mine",
        help="write a trained run's false positives on its training images, or on a folder of "
        "images without objects (hard negatives)",
        description=_wrap(
            "Run a trained detector over its training images and write its false positives "
            "(detections whose IoU with every ground truth of their image is below --iou-thr, "
            "outside ignore regions) with their scores to a hard-negatives JSON file, one entry "
            "per image. Train with them by 'hardmine train --hard-negatives FILE'."
        )
        + "\n\n"
        + _wrap(
            "With --images FOLDER it mines a folder of images that hold none of the classes "
            "instead (searched recursively): every detection there is a false positive. The file "
            "records each image's path in the folder (default: DIR/hard_negatives_images.json); "
            "train with them by 'hardmine train --negative-images FOLDER --hard-negatives FILE'. "
            "It also prints the detections per image scoring at least --fp-score."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--run", required=True, metavar="DIR", help="the run directory (made by hardmine train)"
    )
    _add_data_option(parser, "COCO data to mine instead of the run's (its training images)")
    parser.add_argument(
        "--images",
        metavar="FOLDER",
        help="mine this folder of images without objects instead of the training images",
    )
    parser.add_argument(
        "--output",
        metavar="FILE",
        help="the file to write (default: DIR/hard_negatives.json; with --images, "
        "DIR/hard_negatives_images.json)",
    )
    _add_mining_options(parser)
    _add_fp_score_option(parser, "with --images, ")
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA when available), cpu or cuda (default: auto)"
    )
    parser.set_defaults(command=mine_command, takes_overrides=False)


def _add_fp_score_option(parser: argparse.ArgumentParser, when: str) -> None:
    parser.add_argument(
        "--fp-score",
        type=_number_in(0, 1),
        default=0.5,
        metavar="S",
        help=f"{when}count the detections per image without objects that score at least S, "
        "the false positives per image (default: 0.5)",
    )


def mine_command(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from hardmine.mine import mine_images, mine_run

    if args.images is not None:
        if args.data:
            raise ConfigError("--images mines a folder; --data a dataset's images: give one")
        if args.iou_thr != 0.5:
            raise ConfigError("--iou-thr means nothing with --images: its images have no objects")
        path, mined, fp = mine_images(
            args.run,
            args.images,
            output=args.output,
            device=args.device,
            top_k=args.top_k,
            score_thr=args.score_thr,
            fp_score=args.fp_score,
        )
        print(
            f"{path}: {mined.num_boxes} false positives kept on {len(mined.images)} images of "
            f"{args.images}; {fp:.2f} per image score at least {args.fp_score:g}"
        )
        return 0
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
        )
        + "\n\n"
        + _wrap(
            "With --negative-images FOLDER, classic bootstrapping over images that hold none of "
            "the classes: every round trains with the folder's images as images without objects, "
            "mining is over the folder, and the table adds the detections per image of "
            "--negative-val (default: the folder itself) scoring at least --fp-score."
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
        "--rounds",
        type=_int_at_least(1),
        default=2,
        metavar="R",
        help="trainings in all (default: 2)",
    )
    parser.add_argument(
        "--epochs", type=_int_at_least(1), metavar="E", help="epochs per round (train.epochs)"
    )
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
        type=_number_in(0, 1),
        default=0.25,
        metavar="F",
        help="fraction of the negative picks guaranteed to mined boxes (default: 0.25)",
    )
    parser.add_argument(
        "--recall",
        type=_number_in(0, 1, low_open=True),
        default=0.5,
        metavar="R",
        help="the recall at which false positives per image are reported (default: 0.5)",
    )
    _add_negative_image_options(parser)
    parser.add_argument(
        "--negative-val",
        metavar="FOLDER",
        help="with --negative-images: a folder of images without objects to count false "
        "positives on (default: the --negative-images folder itself)",
    )
    _add_fp_score_option(parser, "with --negative-images, ")
    parser.set_defaults(command=bootstrap_command, takes_overrides=True)


def bootstrap_command(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from hardmine.mine import bootstrap, format_rounds

    if args.negative_images is None:
        given = [
            o for o in ("negative_image_share", "negative_val") if getattr(args, o) is not None
        ]
        if given or args.fp_score != 0.5:
            names = [f"--{o.replace('_', '-')}" for o in given or ["fp_score"]]
            raise ConfigError(f"{', '.join(names)}: only with --negative-images FOLDER")
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
        negative_images=args.negative_images,
        negative_image_share=(
            0.25 if args.negative_image_share is None else args.negative_image_share
        ),
        negative_val=args.negative_val,
        fp_score=args.fp_score,
    )
    fp_score = args.fp_score if args.negative_images is not None else None
    print(format_rounds(results, recall=args.recall, fp_score=fp_score))
    return 0


def _base_config(args: argparse.Namespace, overrides: dict[str, Any]) -> RunConfig:
    """The configuration that ``--config``, ``--epochs``, ``--data`` and ``overrides`` describe.

    Without ``--config`` it is the default comparison's base: built-in scenes, a short CPU
    schedule.
    """
    from hardmine.config import apply_overrides, config_from_dict, config_to_dict
    from hardmine.engine.build import RUN_REGISTRIES, load_run_config
    from hardmine.report.compare import default_compare_base

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


def _describe(config: RunConfig, seeds: Sequence[int], slots: Sequence[Any] | None = None) -> str:
    from hardmine.report.compare import describe

    return describe(config, seeds, slots=slots)


def _format_metrics(metrics: dict[str, float | None]) -> str:
    """``AP 41.2  AP50 60.3 ... APl n/a``: COCO AP in percent, n/a where nothing was measurable."""
    if not metrics:
        return "finished (no evaluation)"
    return "  ".join(f"{k} {'n/a' if v is None else f'{100 * v:.1f}'}" for k, v in metrics.items())


def inspect_parser(subparsers: Subparsers) -> None:
    """``hardmine inspect``."""
    parser = subparsers.add_parser(
        "inspect",
        help="draw what each sampler picks and histogram the IoU of its negatives",
        description="Run every sampler on the same RoIs of a detector and write, to --output: "
        "panels/ (one drawing per image and sampler: ground truths white, picked positives "
        "solid, negatives dashed, coloured by IoU with the ground truth, line width by loss "
        "weight), overview.png (where each sampler's negatives lie: random's share of them "
        "per pixel, and every other sampler's difference to it), overlaps.png (the picked "
        "negatives overlapping a positive by IoU(p,n) >= 0.35), and iou_histograms.png / .csv "
        "(the picked "
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
        default=INSPECT_MODEL,
        help=f"untrained detector without --run (default: {INSPECT_MODEL})",
    )
    parser.add_argument(
        "--proposals",
        choices=["rpn", "jitter"],
        help="RoIs from the detector's RPN (training setting) or jittered ground truths "
        "(default: rpn with --run, jitter without)",
    )
    parser.add_argument(
        "--images", type=_int_at_least(1), default=4, metavar="N", help="images drawn (default: 4)"
    )
    parser.add_argument(
        "--hist-images",
        type=_int_at_least(1),
        metavar="M",
        help="images in the histograms (default: 64, or all when fewer)",
    )
    parser.add_argument(
        "--samplers",
        type=_names(SAMPLER_NAMES),
        default=list(SAMPLER_NAMES),
        metavar="A,B",
        help=f"comma-separated samplers, each once (default: {','.join(SAMPLER_NAMES)})",
    )
    parser.add_argument(
        "--num",
        type=_int_at_least(1),
        metavar="K",
        help="picks per image for every sampler (default: the detector's RoI batch per image)",
    )
    parser.add_argument(
        "--seed", type=_int_at_least(0), default=0, help="seed of proposals and picks"
    )
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
    import torch

    from hardmine._atomic import check_writable
    from hardmine.data.scenes import SPLIT_SIZES
    from hardmine.engine.distributed import resolve_device
    from hardmine.engine.rundir import load_run
    from hardmine.models import DETECTORS, build
    from hardmine.report.inspect import inspect_picks, load_data, samplers_for

    if args.run is None and args.model not in DETECTORS:
        raise ConfigError(
            f"--model: unknown detector {args.model!r}; valid: {', '.join(sorted(DETECTORS))}"
        )
    check_writable(args.output, f"--output {args.output}")  # before the model and the data
    spec = args.data or (None if args.run is not None else "scenes")
    if spec in ("scenes", "scenes:train", "scenes:val"):  # before generating them
        split = "val" if spec.endswith(":val") else "train"
        _check_image_counts(args, SPLIT_SIZES[split], f"the built-in scenes' {split} split")
    device = resolve_device(args.device)
    hist_images = 64 if args.hist_images is None else args.hist_images
    count = max(args.images, hist_images)
    if args.run is not None:
        run = load_run(args.run, device=device)
        model, dataset = run.model, run.train_set
        if args.data is not None:
            dataset = load_data(args.data, num_images=count, image_dir=args.image_dir)
    else:
        dataset = load_data(spec, num_images=count, image_dir=args.image_dir)
        torch.manual_seed(args.seed)
        model = build(args.model, len(dataset.categories) + 1).to(device)
    what = args.data if args.data is not None else f"the training set of {args.run}"
    _check_image_counts(args, len(dataset), what)
    samplers = samplers_for(model, args.samplers, num=args.num)
    source = args.proposals or ("rpn" if args.run is not None else "jitter")
    result = inspect_picks(
        model,
        dataset,
        samplers,
        args.output,
        proposals=source,
        num_images=args.images,
        hist_images=min(hist_images, len(dataset)),
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


def _check_image_counts(args: argparse.Namespace, size: int, what: str) -> None:
    """Refuse ``--images`` / ``--hist-images`` beyond the ``size`` images of the set inspect draws
    from (rather than generate or run through a set of that size silently, for minutes)."""
    for option in ("images", "hist_images"):
        value = getattr(args, option)
        if value is not None and value > size:
            raise ConfigError(
                f"--{option.replace('_', '-')} {value}: {what} has {size} images; give at most "
                f"{size}"
            )


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
    """The ``hardmine`` argument parser with every subcommand (building it imports no torch)."""
    parser = Parser(
        prog="hardmine",
        description="Sample selection for object-detector training: train detectors with OHEM, "
        "IoU-balanced, overlap or random sampling and ATSS or max-IoU assignment, evaluate them "
        "(COCO AP), compare them, see what each sampler picks, and mine hard negatives offline "
        "(bootstrapping). Run 'hardmine COMMAND --help' for a command's options. A mistake in a "
        "command's input ends it with one line on stderr and exit status 2; HARDMINE_DEBUG=1 "
        "shows the traceback.",
        allow_abbrev=False,
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for add in PARSERS:
        add(subparsers)
    for sub in subparsers.choices.values():
        sub.set_defaults(parser=sub)  # for main: the command's prog and options
    return parser


def _check_extra(
    extra: Sequence[str], args: argparse.Namespace, sub: argparse.ArgumentParser
) -> None:
    """Refuse arguments the command does not know, suggesting the nearest option: ``--resum``
    is a mistyped ``--resume``, not an override without a value.

    Raises:
        ConfigError: an unknown option (or any extra argument of a command without overrides).
    """
    options = [o for o in sub._option_string_actions if o.startswith("--")]
    if args.takes_overrides:
        from hardmine.config import RunConfig

        options += [f"--{f.name}" for f in dataclasses.fields(RunConfig)]
    for arg in extra:
        name = arg.partition("=")[0]
        if not arg.startswith("--") or name in options:
            continue
        if args.takes_overrides and "." in name:
            continue  # a configuration key: the configuration checks it, with its own hints
        close = difflib.get_close_matches(name, options, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        if args.takes_overrides:
            raise ConfigError(f"unknown option or configuration key {name}{hint}")
        raise ConfigError(f"unrecognised arguments: {' '.join(extra)}{hint}")
    if extra and not args.takes_overrides:
        raise ConfigError(f"unrecognised arguments: {' '.join(extra)}")


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line.

    An error raised in a ``DataLoader`` worker reaches the main process as the same type with the
    worker's traceback as its message: its last line is the original message.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught ") and "Traceback" in lines[1]:
        name, _, message = lines[-1].partition(": ")
        return message if name.endswith(type(error).__name__) else lines[-1]
    return " ".join(lines) or type(error).__name__


class _HeldNotes(logging.Handler):
    """Holds the configuration's notes (``hardmine.config``: the settings a change of class
    dropped) until the command shows that it works (its first progress line, or its end), so that
    a command that stops at a user's mistake prints that one line only."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.held: list[logging.LogRecord] = []
        self.released = False

    def emit(self, record: logging.LogRecord) -> None:
        if record.name != "hardmine.config":  # the command's own line: its work has begun
            self.show()
        elif self.released:
            logging.getLogger().handle(record)
        else:
            self.held.append(record)

    def show(self) -> None:
        """Print the held notes (through the root logger's handlers) and hold no more."""
        self.released = True
        for record in self.held:
            logging.getLogger().handle(record)
        self.held.clear()


#: The options that name a file or folder: an empty one would mean the working folder.
_PATH_OPTIONS = (
    "config",
    "run",
    "output",
    "images",
    "image_dir",
    "data",
    "hard_negatives",
    "negative_images",
    "negative_val",
)


def _check_paths(args: argparse.Namespace) -> None:
    """Raise ``ConfigError`` for a path option given as an empty string (``--images ''`` mined
    the working folder)."""
    for option in _PATH_OPTIONS:
        value = getattr(args, option, None)
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, str) and not v.strip() for v in values):
            raise ConfigError(f"--{option.replace('_', '-')}: an empty path; give a file or folder")


def _stdout_closed() -> bool:
    """Whether standard output is a pipe whose reader has gone (``POLLERR`` on its end)."""
    import select

    if not hasattr(select, "poll"):  # Windows: a BrokenPipeError there is stdout's, as a rule
        return True
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # not a file (a test's capture)
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hardmine`` with ``argv`` (``sys.argv[1:]`` by default); returns the exit status.

    A user's mistake (``hardmine.errors.HardmineError``) ends the command with one line on stderr
    and its exit status (2); Ctrl-C (``KeyboardInterrupt``) with ``interrupted`` and 130, the
    shells' status for SIGINT (what was written is kept: every file is written atomically, and a
    training resumes from its last checkpoint). ``HARDMINE_DEBUG=1`` lets either through with its
    traceback. A standard output closed by its reader (``hardmine compare ... | head -2``) ends it
    quietly with status 141, what a shell reports for a program that SIGPIPE ended (``yes |
    head``), so that ``set -o pipefail`` sees the usual status; the work done is kept.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        _check_extra(extra, args, args.parser)
        _check_paths(args)
        from hardmine.config import parse_overrides

        overrides = parse_overrides(extra)
        logging.basicConfig(format="%(message)s")
        logging.getLogger("hardmine").setLevel(logging.INFO)  # our progress lines only
        notes = _HeldNotes()
        config_log = logging.getLogger("hardmine.config")
        config_log.propagate = False
        config_log.addHandler(notes)
        logging.getLogger("hardmine").addHandler(notes)
        try:
            status = args.command(args, overrides)
        finally:
            config_log.removeHandler(notes)
            config_log.propagate = True
            logging.getLogger("hardmine").removeHandler(notes)
        notes.show()
        sys.stdout.flush()  # here, where a closed stdout is caught, not at the interpreter's exit
        return status
    except BrokenPipeError:
        if not _stdout_closed():  # another pipe than stdout's: not ours to hide
            raise
        try:  # the interpreter flushes stdout once more on its way out: let that go nowhere
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass
        return 141
    except HardmineError as error:
        if os.environ.get("HARDMINE_DEBUG"):
            raise
        parser.exit(error.exit_status, f"{args.parser.prog}: error: {one_line(error)}\n")
    except KeyboardInterrupt:
        if os.environ.get("HARDMINE_DEBUG"):
            raise
        parser.exit(130, f"{args.parser.prog}: interrupted\n")


if __name__ == "__main__":
    sys.exit(main())
