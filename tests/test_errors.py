"""Every user error of the command line: one line on stderr naming the file / key / id, exit
status 2, no traceback (issue 12; DESIGN.md "Errors, faults and precision").

Each case runs the command in a process of its own. Starting Python and importing torch for each
would cost seconds a case, so one driver process imports hardmine once and forks a child per case
(``_DRIVER``); the child runs ``hardmine.cli.main`` as ``python -m hardmine.cli`` would (an
uncaught exception prints its traceback, exit status 1) with its stderr captured whole. A few
cases also run through the real entry point (``test_entry_point``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC}
ENV.pop("HARDMINE_DEBUG", None)

# Four 64-px scenes, two per step: a run of two steps takes seconds.
TINY = [
    "--model.min_size", "64", "--model.max_size", "64",
    "--data.num_train", "4", "--data.num_val", "2", "--data.image_size", "64",
    "--data.batch_size", "2", "--train.epochs", "1", "--train.warmup_steps", "1",
    "--train.log_every", "1000", "--train.eval_every", "0", "--device", "cpu",
]  # fmt: skip
# A comparison is of its runs' AP, so they are evaluated, once, at the end (two 64-px images).
TINY_COMPARE = list(TINY)
TINY_COMPARE[TINY.index("--train.eval_every") + 1] = "1"

ATSS_TOPK_0 = [
    "train", "--model.name", "atss_tiny", "--sampler", "null",
    "--assigner.name", "atss", "--assigner.topk", "0",
]  # fmt: skip

_DRIVER = r"""
import json, os, sys, traceback
import torch  # imported once, before the forks
import hardmine.cli, hardmine.engine.train, hardmine.mine, hardmine.report.compare

results = {}
for name, argv in json.load(sys.stdin).items():
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        os.dup2(write, 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        try:
            status = hardmine.cli.main(argv)
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else (exit_.code is not None)
        except BaseException:
            traceback.print_exc()
            status = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status or 0)
    os.close(write)
    with os.fdopen(read) as pipe:
        err = pipe.read()
    _, wait_status = os.waitpid(pid, 0)
    results[name] = {"status": os.waitstatus_to_exitcode(wait_status), "stderr": err}
print(json.dumps(results))
"""


def _world(root: Path) -> dict[str, str]:
    """The files the cases need: a finished tiny run, damaged copies of it, bad inputs."""
    import shutil

    from hardmine.config import load_config
    from hardmine.data import SceneDataset, write_coco
    from hardmine.engine.train import train

    run = root / "run"
    overrides = {
        "model.min_size": 64,
        "model.max_size": 64,
        "sampler.num": 16,
        "data.num_train": 4,
        "data.num_val": 2,
        "data.image_size": 64,
        "data.batch_size": 2,
        "train.epochs": 1,
        "train.warmup_steps": 1,
        "train.eval_every": 0,
        "device": "cpu",
        "output_dir": str(run),
    }
    train(load_config(None, overrides))
    for name in ("corrupt", "empty", "nockpt"):
        shutil.copytree(run, root / name)
    data = (run / "checkpoint.pt").read_bytes()
    (root / "corrupt" / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    (root / "empty" / "checkpoint.pt").write_bytes(b"")
    (root / "nockpt" / "checkpoint.pt").unlink()
    (root / "bad.yaml").write_text("train:\n  epochs: 3\n   lr: 0.1\n")
    (root / "twice.yaml").write_text("train:\n  lr: 0.01\n  lr: 0.02\n")
    (root / "empty.yaml").write_text("\n")
    (root / "section_scalar.yaml").write_text("train: 5\n")
    (root / "not_negatives.json").write_text('{"images": []}\n')
    other_ids = {
        "format": "hardmine-hard-negatives",
        "version": 1,
        "source": "elsewhere",
        "settings": {},
        "images": [{"image_id": 9999, "boxes": [], "scores": [], "labels": []}],
    }
    (root / "other_negatives.json").write_text(json.dumps(other_ids))
    far = {**other_ids, "images": [{"image_id": 1, "boxes": [[-500, -500, 5000, 5000]]}]}
    far["images"][0] |= {"scores": [0.9], "labels": [1]}
    (root / "far_negatives.json").write_text(json.dumps(far))
    # Finite in JSON, infinite in float32 (a traceback), or beyond float32's box geometry (with a
    # wide data.box_tolerance it trained, then stopped as if the learning rate diverged).
    for name, box in (("f32inf", [0, 0, 3.5e38, 10]), ("huge", [0, 0, 1e30, 1e30])):
        huge = {**far, "images": [{**far["images"][0], "boxes": [box]}]}
        (root / f"{name}_negatives.json").write_text(json.dumps(huge))
    # COCO data with one category: the run was trained on three.
    write_coco(SceneDataset(2, seed=5, image_size=64, num_classes=1), root / "one_class")
    # COCO data without images.
    (root / "no_images").mkdir()
    empty = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "ring"}]}
    (root / "no_images" / "annotations.json").write_text(json.dumps(empty))
    # S15 D2: a background folder with a 4000x10 strip.
    from PIL import Image

    (root / "wide").mkdir()
    Image.new("RGB", (4000, 10)).save(root / "wide" / "strip.png")
    (root / "bg").mkdir()
    Image.new("RGB", (64, 64)).save(root / "bg" / "a.png")
    (root / "no_bg").mkdir()
    from hardmine.data import HardNegatives, MinedBoxes, save_hard_negatives

    # S15 D1: mined on a folder whose a.png had other bytes.
    other_bytes = HardNegatives(
        images={1: MinedBoxes.empty()},
        source="elsewhere",
        file_names={1: "a.png"},
        folder=str(root / "other_bg"),
        digests={1: "0" * 64},
    )
    save_hard_negatives(other_bytes, root / "other_bg_negatives.json")
    return {"root": str(root)}


def _cases(root: Path) -> dict[str, tuple[list[str], int, str]]:
    """name -> (argv, exit status, text the one line must contain)."""
    r = str(root)
    coco = [f"{r}/one_class/images", f"{r}/one_class/annotations.json"] * 2
    no_images = [
        "--data.kind", "coco", "--data.train_images", f"{r}/no_images",
        "--data.train_ann", f"{r}/no_images/annotations.json",
        "--data.val_images", f"{r}/no_images", "--data.val_ann", f"{r}/no_images/annotations.json",
    ]  # fmt: skip
    out = ["--output_dir", f"{r}/new"]
    no_ann = [f"{r}/one_class/images", f"{r}/nope.json"] * 2
    long_name = "random,random:train.lr=0.0" + "0" * 280 + "1"
    other_bg = ["--hard-negatives", f"{r}/other_bg_negatives.json"]
    no_bg_val = ["--negative-val", f"{r}/no_bg", "--rounds", "1", "--output", f"{r}/b_nv"]
    cases: dict[str, tuple[list[str], int, str]] = {
        "config missing": (["train", "--config", f"{r}/nope.yaml"], 2, "nope.yaml: no such"),
        "config yaml syntax": (["train", "--config", f"{r}/bad.yaml"], 2, "bad.yaml: not valid"),
        # Third stranger: YAML keeps the last of a repeated key silently; an empty file is a
        # wrong or cut-off file more likely than a wish for every default.
        "config key twice": (
            ["train", "--config", f"{r}/twice.yaml"],
            2,
            "twice.yaml: not valid YAML at line 3, column 3: key 'lr' given twice",
        ),
        "config empty": (
            ["train", "--config", f"{r}/empty.yaml"],
            2,
            "empty.yaml: the file is empty",
        ),
        "epochs 0": (["train", "--train.epochs", "0"], 2, "train.epochs: must be at least 1"),
        "grad_clip inf": (
            ["train", "--train.grad_clip", "inf"],
            2,
            "train.grad_clip: must be positive and finite (or null), got inf",
        ),
        # The stranger's check of train.grad_clip: values that are no YAML went to a traceback.
        "override not yaml": (
            ["train", "--train.grad_clip", "@1"],
            2,
            "override --train.grad_clip: '@1' is not a YAML value",
        ),
        "override unclosed quote": (
            ["train", "--train.lr", '"1'],
            2,
            "override --train.lr: '\"1' is not a YAML value",
        ),
        "epochs -1": (["train", "--train.epochs", "-1"], 2, "train.epochs: must be at least 1"),
        "sampler num -5": (["train", "--sampler.num", "-5"], 2, "sampler.num"),
        "ohem num 0": (
            ["train", "--sampler.name", "ohem", "--sampler.num", "0"],
            2,
            "sampler.num",
        ),
        "pos_fraction 2": (["train", "--sampler.pos_fraction", "2"], 2, "sampler.pos_fraction"),
        "ohem nms_iou 5": (
            ["train", "--sampler.name", "ohem", "--sampler.nms_iou", "5"],
            2,
            "sampler.nms_iou",
        ),
        "iou_balanced num_bins 0": (
            ["train", "--sampler.name", "iou_balanced", "--sampler.num_bins", "0"],
            2,
            "sampler.num_bins",
        ),
        "atss topk 0": (
            ATSS_TOPK_0,
            2,
            "assigner.topk",
        ),
        "device typo": (["train", "--device", "cude"], 2, "device"),
        "resum": (["train", "--resum"], 2, "did you mean --resume?"),
        "eval typo": (["eval", "--run", r, "--devcie", "cpu"], 2, "did you mean --device?"),
        "eval missing run": (["eval", "--run", f"{r}/missing"], 2, "missing: no such run"),
        "eval without checkpoint": (["eval", "--run", f"{r}/nockpt"], 2, "no checkpoint.pt"),
        "eval corrupt checkpoint": (
            ["eval", "--run", f"{r}/corrupt", "--device", "cpu"],
            2,
            "corrupt/checkpoint.pt: not a readable checkpoint",
        ),
        "eval 0-byte checkpoint": (
            ["eval", "--run", f"{r}/empty", "--device", "cpu"],
            2,
            "empty/checkpoint.pt: the checkpoint is empty",
        ),
        "not hard negatives": (
            ["train", *TINY, *out, "--hard-negatives", f"{r}/not_negatives.json"],
            2,
            "not_negatives.json: not a hard-negatives file",
        ),
        "hard negatives of another dataset": (
            ["train", *TINY, *out, "--hard-negatives", f"{r}/other_negatives.json"],
            2,
            "other_negatives.json: hard negatives mined from elsewhere name 1 image ids",
        ),
        # S12: mined boxes far outside their image are refused like the dataset's.
        "hard negatives outside the image": (
            ["train", *TINY, *out, "--hard-negatives", f"{r}/far_negatives.json"],
            2,
            "far_negatives.json: hard negatives mined from elsewhere: image id 1: box "
            "[-500.0, -500.0, 5000.0, 5000.0] reaches more than 1 px outside the 64x64 image",
        ),
        "hard negatives beyond float32": (
            ["train", *TINY, *out, "--hard-negatives", f"{r}/f32inf_negatives.json"],
            2,
            "f32inf_negatives.json: images[0] (image_id 1): boxes[0] = [0, 0, 3.5e+38, 10] "
            "reaches beyond ±4.61169e+18 px",
        ),
        "hard negatives with overflowing areas": (
            ["train", *TINY, *out, "--hard-negatives", f"{r}/huge_negatives.json"],
            2,
            "huge_negatives.json: images[0] (image_id 1): boxes[0] = [0, 0, 1e+30, 1e+30] reaches",
        ),
        "mine other categories": (
            ["mine", "--run", f"{r}/run", "--data", *coco, "--output", f"{r}/x.json"],
            2,
            "was trained on the categories",
        ),
        "empty training set": (["train", *TINY, *out, *no_images], 2, "has no images"),
        "data.root missing": (
            ["train", *TINY, *out, "--data.kind", "coco", "--data.root", f"{r}/nowhere"],
            2,
            "nowhere: no such folder",
        ),
        "run exists": (["train", "--config", f"{r}/run/config.yaml"], 2, "pass --resume"),
        "output_dir is a file": (
            ["train", *TINY, "--output_dir", f"{r}/bad.yaml/run"],
            2,
            "bad.yaml is a file, not a folder",
        ),
        "sampler on a dense detector": (
            ["train", *TINY, *out, "--model.name", "retinanet_tiny"],
            2,
            "sampler: retinanet_tiny trains on every anchor",
        ),
        # Defect D5: ATSS needs pyramid levels; an R-CNN's proposals have none.
        "atss on an R-CNN": (
            ["train", *TINY, *out, "--assigner.name", "atss"],
            2,
            "assigner.name: atss labels anchors on a feature pyramid; faster_rcnn_tiny",
        ),
        # Defect D10: settings are type- and finiteness-checked where the class is made.
        "overlap epsilon inf": (
            ["train", "--sampler.name", "overlap", "--sampler.epsilon", "inf"],
            2,
            "sampler.epsilon: must be finite, got inf",
        ),
        "sampler num 2.5": (["train", "--sampler.num", "2.5"], 2, "sampler.num: expected int"),
        "bool as a string": (
            ["train", "--sampler.name", "overlap", "--sampler.linear_top_up", "'yes'"],
            2,
            "sampler.linear_top_up: expected bool, got 'yes'",
        ),
        # Defect D8: every model setting is range-checked where the configuration is read.
        "model min_size 0": (["train", "--model.min_size", "0"], 2, "model.min_size: must be"),
        "model size_divisible 0": (
            ["train", "--model.size_divisible", "0"],
            2,
            "model.size_divisible: must be at least 1, got 0",
        ),
        "model weights foo": (["train", "--model.weights", "foo"], 2, "model.weights: must be"),
        "model box_nms_thresh 2": (
            ["train", "--model.box_nms_thresh", "2"],
            2,
            "model.box_nms_thresh: must be in [0, 1], got 2",
        ),
        "eval box_nms_thresh 2": (
            ["eval", "--run", f"{r}/run", "--device", "cpu", "--model.box_nms_thresh", "2"],
            2,
            "model.box_nms_thresh: must be in [0, 1], got 2",
        ),
        # S12: every inference setting is range-checked in eval too.
        "eval box_score_thresh -1": (
            ["eval", "--run", f"{r}/run", "--device", "cpu", "--model.box_score_thresh", "-1"],
            2,
            "model.box_score_thresh: must be in [0, 1], got -1",
        ),
        "eval box_detections_per_img 0": (
            ["eval", "--run", f"{r}/run", "--device", "cpu", "--model.box_detections_per_img", "0"],
            2,
            "model.box_detections_per_img: must be at least 1, got 0",
        ),
        # S12: --score-thr is range-checked like --iou-thr.
        "mine score-thr 1.5": (
            ["mine", "--run", f"{r}/run", "--score-thr", "1.5"],
            2,
            "--score-thr: must be in [0, 1], got 1.5",
        ),
        "mine score-thr -1": (
            ["mine", "--run", f"{r}/run", "--score-thr", "-1"],
            2,
            "--score-thr: must be in [0, 1], got -1",
        ),
        "bootstrap score-thr 2": (
            ["bootstrap", "--score-thr", "2"],
            2,
            "--score-thr: must be in [0, 1], got 2",
        ),
        # A compare variant's model settings are range-checked before any run trains.
        "compare variant box_loss_beta -1": (
            ["compare", "--methods", "random,ohem:model.box_loss_beta=-1", "--output", f"{r}/cmp"],
            2,
            "--methods ohem:model.box_loss_beta=-1: model.box_loss_beta: must be at least 0",
        ),
        # Defect D9: eval refuses overrides that inference does not read.
        "eval box_loss_beta": (
            ["eval", "--run", f"{r}/run", "--model.box_loss_beta", "1.0"],
            2,
            "--model.box_loss_beta: a training setting, which evaluation does not read",
        ),
        "eval score_dtype": (
            ["eval", "--run", f"{r}/run", "--model.score_dtype", "float16"],
            2,
            "--model.score_dtype: a training setting",
        ),
        "eval num_train": (
            ["eval", "--run", f"{r}/run", "--data.num_train", "8"],
            2,
            "--data.num_train: a training setting",
        ),
        # Defect D6: a variant may not change the detector or the data.
        "variant data.kind": (
            ["compare", "--methods", "random:data.kind=coco"],
            2,
            "--methods random:data.kind=coco: a variant may not set data.kind",
        ),
        "variant model.name": (
            ["compare", "--methods", "overlap:model.name=retinanet_tiny"],
            2,
            "a variant may not set model.name",
        ),
        "variant num_classes": (
            ["compare", "--methods", "random:data.num_classes=9"],
            2,
            "a variant may not set data.num_classes",
        ),
        "variant value not yaml": (
            ["compare", "--methods", "retinanet_atss:train.grad_clip=*a"],
            2,
            "--methods retinanet_atss:train.grad_clip=*a: train.grad_clip: '*a' is not a YAML",
        ),
        # A colon inside brackets split the variant there (a traceback).
        "variant mapping value": (
            ["compare", "--methods", "random:train.lr={a: 1}"],
            2,
            "train.lr",
        ),
        # Defect D18: a key once per variant; a component's settings need its name.
        "variant key twice": (
            ["compare", "--methods", "random:sampler.num=1:num=2"],
            2,
            "sampler.num given more than once",
        ),
        "assigner settings without a name": (
            ["train", "--assigner.pos_thr", "0.4"],
            2,
            "give assigner.name too (valid names: atss, max_iou)",
        ),
        "eval a file": (["eval", "--run", f"{r}/bad.yaml"], 2, "a file, not a run directory"),
        "resume changed": (
            ["train", "--config", f"{r}/run/config.yaml", "--resume", "--sampler.name", "ohem"],
            2,
            "sampler.name: 'random' -> 'ohem'",
        ),
        # Issue 12 (S12): an empty path would write the run into the working folder.
        "empty output_dir": (["train", "--output_dir", ""], 2, "output_dir: an empty path"),
        "empty hard negatives": (
            ["train", "--hard_negatives", ""],
            2,
            "hard_negatives: an empty path",
        ),
        # S12: a malformed section is refused with and without an override of it.
        "section not a mapping": (
            ["train", "--config", f"{r}/section_scalar.yaml"],
            2,
            "section_scalar.yaml: train: expected a mapping, got 5",
        ),
        "section not a mapping, overridden": (
            ["train", "--config", f"{r}/section_scalar.yaml", "--train.epochs", "1"],
            2,
            "section_scalar.yaml: train: expected a mapping, got 5",
        ),
        # S12: COCO paths are not silently ignored by the generated scenes.
        "coco path with scenes": (
            ["train", "--data.train_images", f"{r}/one_class/images"],
            2,
            "data.train_images: a COCO path, but data.kind is 'scenes'",
        ),
        "roi_loss_images -1": (
            ["train", "--train.roi_loss_images", "-1"],
            2,
            "train.roi_loss_images: must be at least 0, got -1",
        ),
        # S12: every command checks where it writes before any work (one helper,
        # hardmine._atomic.check_writable); an unwritable folder: test_unwritable_output.
        "mine output under a file": (
            ["mine", "--run", f"{r}/run", "--output", f"{r}/bad.yaml/x.json"],
            2,
            "--output " + f"{r}/bad.yaml/x.json: {r}/bad.yaml is a file, not a folder",
        ),
        "inspect output under a file": (
            ["inspect", "--images", "1", "--output", f"{r}/bad.yaml/insp"],
            2,
            "bad.yaml is a file, not a folder",
        ),
        "inspect output empty": (["inspect", "--output", ""], 2, "--output: an empty path"),
        "mine images extreme aspect": (
            ["mine", "--run", f"{r}/run", "--images", f"{r}/wide", "--output", f"{r}/w.json"],
            2,
            "wide/strip.png: 4000x10 pixels, a long side more than 50 times",
        ),
        "mine images empty": (
            ["mine", "--run", f"{r}/run", "--images", ""],
            2,
            "--images: an empty path",
        ),
        "eval run empty": (["eval", "--run", ""], 2, "--run: an empty path"),
        "compare output under a file": (
            ["compare", "--methods", "random", "--output", f"{r}/bad.yaml/cmp"],
            2,
            "bad.yaml is a file, not a folder",
        ),
        "bootstrap output under a file": (
            ["bootstrap", "--output", f"{r}/bad.yaml/boot"],
            2,
            "bad.yaml is a file, not a folder",
        ),
        # S15 D7: every run started and failed, a report of failures written.
        "compare device cuda without CUDA": (
            ["compare", *TINY_COMPARE, "--device", "cuda", "--output", f"{r}/cmp_cuda"],
            2,
            "device 'cuda': this machine has no CUDA device; use cpu or auto",
        ),
        # S16: the data, an unmakeable --output or run folder, each refused before any run
        # (every run started and failed, or the comparison crashed with a traceback).
        "compare data folder missing": (
            ["compare", *TINY_COMPARE, "--data", f"{r}/nodata", "--output", f"{r}/cmp_nodata"],
            2,
            f"data.root {r}/nodata: no such folder",
        ),
        "compare coco annotations missing": (
            ["compare", *TINY_COMPARE, "--data", *no_ann, "--output", f"{r}/cmp_nococo"],
            2,
            f"{r}/nope.json: annotation file not found",
        ),
        "compare output that cannot be made": (
            ["compare", *TINY_COMPARE, "--output", "/proc/hardmine_cmp"],
            2,
            "--output /proc/hardmine_cmp: cannot make /proc/hardmine_cmp: No such file",
        ),
        "compare method name too long for a folder": (
            ["compare", *TINY_COMPARE, "--methods", long_name, "--output", f"{r}/cmp_long"],
            2,
            ": File name too long",
        ),
        "compare methods empty": (["compare", "--methods", ""], 2, "--methods"),
        # Without evaluation there is no AP to compare (it printed "0 runs" and AP n/a).
        "compare without evaluation": (
            ["compare", "--train.eval_every", "0", "--output", f"{r}/cmp_noeval"],
            2,
            "compare: error: train.eval_every 0 trains without evaluation",
        ),
        "compare variant without evaluation": (
            ["compare", "--methods", "random:train.eval_every=0", "--plan"],
            2,
            "--methods random:train.eval_every=0: train.eval_every 0 trains without",
        ),
        "compare jobs neither a number nor auto": (
            ["compare", "--jobs", "many"],
            2,
            "--jobs: expected an integer, got 'many' (or 'auto')",
        ),
        "compare jobs zero": (["compare", "--jobs", "0"], 2, "must be at least 1, got 0 (or"),
        "compare methods twice": (
            ["compare", "--methods", "random,ohem,random"],
            2,
            "random given more than once",
        ),
        "compare unknown method": (["compare", "--methods", "rando"], 2, "unknown method 'rando'"),
        # S15 D4: refused only after training and mining round 0.
        "bootstrap rounds without a sampler": (
            ["bootstrap", *TINY, *ATSS_TOPK_0[1:5], "--rounds", "2", "--output", f"{r}/b_atss"],
            2,
            "hard_negatives: atss_tiny has no sampler (sampler: null); the rounds after the first",
        ),
        "hard negatives of another folder with the same names": (
            ["train", *TINY, *out, "--negative-images", f"{r}/bg", *other_bg],
            2,
            f"{r}/bg/a.png: not the image mined as a.png on {r}/other_bg (other bytes)",
        ),
        # S15 D8: a non-finite gradient at step 1, blamed on the learning rate.
        "pisa carl_k 60": (
            ["train", *TINY, *out, "--sampler.name", "pisa", "--sampler.carl_k", "60"],
            2,
            "sampler.carl_k: must be a finite number in [0, 10], got 60.0",
        ),
        # S15 D9, D13, D12.
        "train image share without a folder": (
            ["train", *TINY, *out, "--negative-image-share", "0.5"],
            2,
            "--negative-image-share: only with --negative-images FOLDER",
        ),
        "train image share -0.1": (
            ["train", "--negative-image-share", "-0.1"],
            2,
            "--negative-image-share: must be in [0, 1), got -0.1",
        ),
        "train image share nan": (
            ["train", "--negative-image-share", "nan"],
            2,
            "--negative-image-share: must be in [0, 1), got nan",
        ),
        "bootstrap image share 0 without a folder": (
            ["bootstrap", "--negative-image-share", "0"],
            2,
            "--negative-image-share: only with --negative-images FOLDER",
        ),
        "bootstrap empty negative-val": (
            ["bootstrap", *TINY, "--negative-images", f"{r}/bg", *no_bg_val],
            2,
            "no_bg: no image files",
        ),
        "bootstrap share 2": (["bootstrap", "--share", "2"], 2, "--share: must be in [0, 1]"),
        "bootstrap recall 2": (["bootstrap", "--recall", "2"], 2, "--recall: must be in (0, 1]"),
        "inspect images 0": (["inspect", "--images", "0"], 2, "--images: must be at least 1"),
        # S12: inspect generated 100000 scenes silently for minutes; it draws from a set of a
        # known size (the scenes' split, the run's training set) and refuses more.
        "inspect images beyond the split": (
            ["inspect", "--images", "100000", "--hist-images", "2"],
            2,
            "--images 100000: the built-in scenes' train split has 512 images",
        ),
        "inspect images beyond the run's set": (
            ["inspect", "--run", f"{r}/run", "--images", "5", "--device", "cpu"],
            2,
            f"--images 5: the training set of {r}/run has 4 images",
        ),
        "inspect samplers twice": (
            ["inspect", "--samplers", "ohem,ohem"],
            2,
            "ohem given more than once",
        ),
    }
    # A diverging run: the documented one-line stop (exit status 1: the input was valid), for
    # every sampler; no checkpoint was written before step 4 (the end of epoch 1), and it says so.
    for sampler in ("random", "ohem", "iou_balanced", "overlap"):
        argv = ["train", *TINY, "--data.num_train", "8", "--train.epochs", "2"]
        argv += ["--train.lr", "20", "--train.warmup_steps", "0", "--sampler.name", sampler]
        argv += ["--output_dir", f"{r}/diverge_{sampler}"]
        cases[f"diverges with {sampler}"] = (argv, 1, "non-finite loss at step ")
    return cases


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("cli_errors")
    _world(root)
    cases = _cases(root)
    done = subprocess.run(
        [sys.executable, "-c", _DRIVER],
        input=json.dumps({name: argv for name, (argv, _, _) in cases.items()}),
        capture_output=True,
        text=True,
        env=ENV,
        cwd=root,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    return {name: (results[name], cases[name]) for name in cases} | {"_root": root}


CASE_NAMES = list(_cases(Path("/x")))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_one_line_and_exit_status(name: str, outcomes: dict[str, Any]) -> None:
    if "without CUDA" in name:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    result, (_, status, text) = outcomes[name]
    lines = result["stderr"].splitlines()
    assert "Traceback" not in result["stderr"], result["stderr"]
    assert len(lines) == 1, result["stderr"]
    assert result["status"] == status, result["stderr"]
    assert text in lines[0], lines[0]


def test_refused_commands_start_no_work(outcomes: dict[str, Any]) -> None:
    assert not (outcomes["_root"] / "b_atss" / "round0").exists()
    assert not (outcomes["_root"] / "b_nv" / "round0").exists()
    assert not (outcomes["_root"] / "cmp_cuda").exists()


def test_refused_comparisons_make_no_folder(outcomes: dict[str, Any]) -> None:
    for name in ("cmp_nodata", "cmp_nococo", "cmp_long", "cmp_noeval"):
        assert not (outcomes["_root"] / name).exists(), name


def test_a_diverged_run_claims_no_checkpoint_it_did_not_write(outcomes: dict[str, Any]) -> None:
    for sampler in ("random", "ohem", "iou_balanced", "overlap"):
        result, _ = outcomes[f"diverges with {sampler}"]
        assert "no checkpoint was written" in result["stderr"]
        assert "last checkpoint" not in result["stderr"]


@pytest.mark.parametrize(
    ("argv", "text"),
    [
        (["train", "--config", "nope.yaml"], "nope.yaml: no such configuration file"),
        (["train", "--resum"], "did you mean --resume?"),
        (["compare", "--methods", ""], "--methods"),
    ],
)
def test_entry_point(argv: list[str], text: str, tmp_path: Path) -> None:
    """The real ``python -m hardmine.cli``: one line, exit status 2."""
    done = subprocess.run(
        [sys.executable, "-m", "hardmine.cli", *argv],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and text in done.stderr


def test_ctrl_c_ends_in_one_line_and_status_130(tmp_path: Path) -> None:
    """S15 D14: Ctrl-C printed a KeyboardInterrupt traceback."""
    import signal
    import time

    run = tmp_path / "run"
    argv = ["train", *TINY, "--train.epochs", "1000", "--train.log_every", "1"]
    argv += ["--output_dir", str(run)]
    process = subprocess.Popen(
        [sys.executable, "-m", "hardmine.cli", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 120
        # Training has taken a step: every module is imported (an interrupt inside a C
        # extension's import is CPython's to report), and it is busy training.
        while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").stat().st_size:
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "Traceback" not in err, err
    assert err.splitlines()[-1] == "hardmine train: interrupted", err


def test_hardmine_debug_shows_the_traceback(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "hardmine.cli", "train", "--config", "nope.yaml"],
        capture_output=True,
        text=True,
        env={**ENV, "HARDMINE_DEBUG": "1"},
        cwd=tmp_path,
    )
    assert done.returncode != 0
    assert "Traceback" in done.stderr and "ConfigError: nope.yaml" in done.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to a read-only folder")
def test_unwritable_output(outcomes: dict[str, Any], tmp_path: Path) -> None:
    """S12: a read-only output location is one line before the work, not a traceback after it
    (``eval`` writes into the run, the others into --output)."""
    import shutil

    root = outcomes["_root"]
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    ro = tmp_path / "ro"
    ro.mkdir()
    for folder in (run, ro):
        folder.chmod(0o555)
    try:
        for argv in (
            ["eval", "--run", str(run), "--device", "cpu"],
            ["mine", "--run", str(root / "run"), "--output", str(ro / "x.json")],
            ["inspect", "--images", "1", "--output", str(ro / "insp")],
        ):
            done = subprocess.run(
                [sys.executable, "-m", "hardmine.cli", *argv],
                capture_output=True,
                text=True,
                env=ENV,
                cwd=tmp_path,
            )
            assert done.returncode == 2, done.stderr
            assert "Traceback" not in done.stderr
            assert done.stderr.count("\n") == 1 and "is not writable" in done.stderr
    finally:
        for folder in (run, ro):
            folder.chmod(0o755)


def test_check_writable_names_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one helper every command uses; ``os.access`` stands in for a read-only folder (root
    writes to any)."""
    from hardmine._atomic import check_writable
    from hardmine.errors import RunError

    check_writable(tmp_path / "new" / "deeper", "--output x")  # missing folders can be made
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(RunError, match=f"^--output x: {re.escape(str(tmp_path))} is not writable$"):
        check_writable(tmp_path / "new", "--output x")
    with pytest.raises(RunError, match=r"^--output: an empty path"):
        check_writable("", "--output")


def _cli(*argv: str, cwd: Path, **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hardmine.cli", *argv],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=cwd,
        **kwargs,
    )


@contextlib.contextmanager
def _lock_held_elsewhere(lock: Path) -> Iterator[None]:
    """Another process holds ``flock`` on ``lock`` (as a running command does) until the block
    ends; then it is killed, which frees the lock."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, time\n"
         f"f = open({str(lock)!r}, 'a'); fcntl.flock(f, fcntl.LOCK_EX)\n"
         "print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        yield
    finally:
        holder.kill()
        holder.wait()


def test_one_comparison_per_folder_at_a_time(tmp_path: Path) -> None:
    """S16: two comparisons in one folder trained the same runs at once (each run's
    metrics.jsonl twice over); the second is refused, and a killed holder holds nothing."""
    import fcntl

    from hardmine._atomic import LOCK_NAME

    out = tmp_path / "cmp"
    out.mkdir()
    argv = ["compare", *TINY_COMPARE, "--methods", "random", "--seeds", "1", "--output", str(out)]
    with _lock_held_elsewhere(out / LOCK_NAME):  # what a running comparison holds
        for extra in ([], ["--plan"]):
            done = _cli(*argv, *extra, cwd=tmp_path)
            assert done.returncode == 2, done.stderr
            assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
            assert f"--output {out}: another hardmine compare is using {out}" in done.stderr
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing started
    with open(out / LOCK_NAME) as f:  # the killed holder's lock went with it
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(f, fcntl.LOCK_UN)
    done = _cli(*argv, "--plan", cwd=tmp_path)
    assert done.returncode == 0, done.stderr


def test_one_training_per_run_at_a_time(tmp_path: Path) -> None:
    """S16: ``hardmine train`` on a run that another ``train`` (or a comparison) is training was
    let through, both appending to its metrics.jsonl; a refused train leaves no folder."""
    from hardmine._atomic import LOCK_NAME, hold_folder
    from hardmine.errors import RunError
    from hardmine.report.compare import train_run

    run = tmp_path / "run"
    argv = ["train", *TINY, "--output_dir", str(run)]
    run.mkdir()
    with _lock_held_elsewhere(run / LOCK_NAME):
        done = _cli(*argv, cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
        assert f"output_dir {run}: another hardmine train or compare is using" in done.stderr
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]
        from hardmine.config import load_config

        with pytest.raises(RunError, match="another hardmine train or compare is using"):
            train_run(load_config(None, {"output_dir": str(run), "device": "cpu"}))
    # A train refused by its own checks leaves no folder behind (nor its lock file).
    with hold_folder(tmp_path / "other", "x", "y"):
        assert (tmp_path / "other" / LOCK_NAME).exists()
    assert not (tmp_path / "other").exists()


def test_a_closed_stdout_ends_quietly(tmp_path: Path) -> None:
    """S16: ``hardmine compare ... | head -2`` ended in a BrokenPipeError traceback (twice: the
    print, then the interpreter's flush at exit); now quietly, with the shells' 141."""
    argv = ["compare", *TINY_COMPARE, "--methods", "random,ohem", "--seeds", "3", "--plan"]
    process = subprocess.Popen(
        [sys.executable, "-m", "hardmine.cli", *argv, "--output", str(tmp_path / "cmp")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path,
    )  # fmt: skip
    process.stdout.close()  # the reader is gone before the first line
    err = process.stderr.read()
    assert process.wait(timeout=120) == 141, err
    assert err == "", err
    assert (tmp_path / "cmp" / "ohem" / "seed2" / "config.yaml").exists()  # the work was done


def test_check_writable_makes_the_folders_and_leaves_none(tmp_path: Path) -> None:
    """S16: it let ``/proc/x`` and a name over 255 bytes through; mkdir failed after the work."""
    from hardmine._atomic import check_writable
    from hardmine.errors import RunError

    check_writable(tmp_path / "a" / "b" / "c", "--output x")
    assert list(tmp_path.iterdir()) == []  # proven, then removed: a refused command leaves none
    long = tmp_path / "a" / ("x" * 300)
    with pytest.raises(
        RunError, match=f"^--output x: cannot make {re.escape(str(long))}: File name"
    ):
        check_writable(long / "seed0", "--output x")
    assert list(tmp_path.iterdir()) == []
