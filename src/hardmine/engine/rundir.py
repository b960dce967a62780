"""The run directory: its file names, the metrics log, its plot and ``load_run``.

A run directory holds::

    config.yaml      the resolved configuration
    metrics.jsonl    one row per logged step (losses, learning rate, picks per image) and per
                     evaluation (COCO AP)
    checkpoint.pt    the latest checkpoint
    results.json     the final evaluation; its presence marks the run finished
    detections.json  the final evaluation's detections (COCO results, boxes only), for an error
                     breakdown
    eval.json        the latest ``hardmine eval`` of the checkpoint
    plots/           losses.png
    tensorboard/     the same scalars for TensorBoard

Every file but the append-only metrics log is written atomically (``write_atomic``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from torch import nn
from torch.utils.data import Dataset

from hardmine._atomic import write_atomic
from hardmine.config import RunConfig
from hardmine.engine import checkpoint
from hardmine.engine.build import build_datasets, build_detector, load_run_config
from hardmine.errors import CheckpointError, DataError, RunError

CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"
RESULTS_NAME = "results.json"
EVAL_NAME = "eval.json"
DETECTIONS_NAME = "detections.json"
LOSS_PLOT = Path("plots") / "losses.png"
log = logging.getLogger(__name__)


def finite_or_none(value: Any) -> Any:
    """``value`` with every NaN / infinite float replaced by None, recursively: JSON has no NaN
    (``json.dumps`` would write ``NaN``, which no strict JSON reader accepts)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(v) for v in value]
    return value


def write_json(path: str | Path, document: Any) -> Path:
    """``document`` as indented JSON, written atomically (non-finite numbers as null)."""
    return write_atomic(
        path, json.dumps(finite_or_none(document), indent=2, allow_nan=False) + "\n"
    )


def write_detections(path: str | Path, detections: Sequence[Mapping[str, Any]]) -> Path:
    """COCO box results as compact JSON (boxes to 0.01 px, scores to 5 digits), atomically.

    Mask results keep their boxes only: the error breakdown is about boxes.
    """
    rows = [
        {
            "image_id": int(d["image_id"]),
            "category_id": int(d["category_id"]),
            "bbox": [round(float(v), 2) for v in d["bbox"]],
            "score": round(float(d["score"]), 5),
        }
        for d in detections
    ]
    return write_atomic(path, json.dumps(rows, separators=(",", ":")) + "\n")


def read_detections(path: str | Path) -> list[dict[str, Any]] | None:
    """The detections ``write_detections`` wrote; None if the file does not exist."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (empty if the file does not exist).

    A last line that is not valid JSON is the row of a run killed while writing it: it is left
    out (with a warning). Any other bad line is a damaged file.

    Raises:
        DataError: a line other than the last is not valid JSON; the message names the file and
            the line.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if any(rest.strip() for rest in lines[number:]):
                raise DataError(f"{path}: line {number} is not valid JSON") from None
            log.warning("%s: left out its last line, half-written by a killed run", path)
    return rows


def loss_curve(rows: Sequence[Mapping[str, Any]], key: str = "loss") -> dict[int, float]:
    """Step -> ``key`` of the training rows of a metrics log (rows where it is null left out)."""
    return {r["step"]: r[key] for r in rows if r.get(key) is not None}


class MetricsLog:
    """``metrics.jsonl`` and TensorBoard scalars of the main process.

    On resume, rows after the checkpoint's step are dropped (the killed run may have logged steps
    that the resumed run takes again), and so are the end-of-epoch rows at the checkpoint's step
    (an evaluation, or the mean loss over all RoIs alone): the resumed run ends that epoch again,
    so each is in the log once.
    """

    def __init__(self, run_dir: Path, *, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # slow import, main process only

        self.path = run_dir / METRICS_NAME
        if resume_step is None:
            write_atomic(self.path, "")
        elif self.path.exists():
            rows = [
                r
                for r in read_metrics(self.path)
                if r["step"] < resume_step
                or (r["step"] == resume_step and "eval" not in r and "roi_loss" not in r)
            ]
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in rows))
        self.tensorboard = SummaryWriter(run_dir / "tensorboard", purge_step=resume_step)

    def write(self, row: Mapping[str, Any]) -> None:
        """Append ``row`` (flat numbers, or dicts of numbers) to both; a non-finite number is
        written as null to the log and left out of TensorBoard."""
        with self.path.open("a") as f:
            f.write(json.dumps(finite_or_none(row), allow_nan=False) + "\n")
        for key, value in row.items():
            scalars = value.items() if isinstance(value, Mapping) else [(None, value)]
            for sub, v in scalars:
                if key in ("step", "epoch") or not isinstance(v, int | float):
                    continue
                if math.isfinite(v):
                    tag = key if sub is None else f"{key}/{sub}"
                    self.tensorboard.add_scalar(tag, v, row["step"])

    def close(self) -> None:
        self.tensorboard.close()


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 120) -> Path:
    """Write a matplotlib figure atomically, in the format of ``path``'s suffix."""
    path = Path(path)
    return write_atomic(path, lambda f: fig.savefig(f, format=path.suffix[1:], dpi=dpi))


def plot_loss_curves(
    curves: Mapping[str, Mapping[int, float]],
    path: str | Path,
    *,
    ylabel: str = "training loss",
) -> Path:
    """One line per label: a loss against step (points marked: evaluations may be few).

    Args:
        curves: label -> (step -> loss).
        path: the PNG to write (its folder is created).
        ylabel: what the loss is.
    """
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for label, curve in curves.items():
        steps = sorted(curve)
        marker = "o" if len(steps) < 20 else None
        ax.plot(steps, [curve[s] for s in steps], label=label, marker=marker)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    values = [v for curve in curves.values() for v in curve.values() if v > 0]
    # A log scale only where the values span a range worth it, with plain numbers at 1, 2 and 5
    # times the powers of ten (0.2, 0.5, 1, 2), not "2×10⁰"; linear otherwise.
    if values and max(values) / min(values) >= 4:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize="small")
    return save_figure(fig, path)


def plot_run(run_dir: str | Path) -> Path:
    """``plots/losses.png`` of a run: its training loss against step."""
    run_dir = Path(run_dir)
    curve = loss_curve(read_metrics(run_dir / METRICS_NAME))
    return plot_loss_curves({run_dir.name: curve}, run_dir / LOSS_PLOT)


@dataclass(frozen=True)
class LoadedRun:
    """A run directory read back: its configuration, detector and datasets.

    Attributes:
        run_dir: the run directory.
        config: its configuration (with any overrides applied).
        model: the detector with the checkpoint's weights, on the device, in eval mode.
        train_set: the training set (without hard negatives).
        val_set: the validation set.
        categories: the category names (label ``i + 1`` is ``categories[i]``).
        step: the steps the checkpoint had taken.
    """

    run_dir: Path
    config: RunConfig
    model: nn.Module
    train_set: Dataset
    val_set: Dataset
    categories: list[str]
    step: int


def load_run(
    run_dir: str | Path,
    *,
    device: torch.device | str = "cpu",
    overrides: Mapping[str, Any] | None = None,
) -> LoadedRun:
    """A finished (or checkpointed) run's configuration, detector and datasets.

    The one way every command (``eval``, ``mine``, ``bootstrap``, ``inspect``, ``compare``) reads
    a run back.

    Args:
        run_dir: a run directory with ``config.yaml`` and ``checkpoint.pt``.
        device: where to put the detector.
        overrides: dotted configuration overrides, e.g. other ``data.*`` to mine on.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"{run_dir}: a file, not a run directory")
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run directory")
    if not (run_dir / CONFIG_NAME).is_file():
        raise RunError(
            f"{run_dir}: not a run directory (no {CONFIG_NAME}; hardmine train makes one)"
        )
    ckpt_path = run_dir / checkpoint.CHECKPOINT_NAME
    if not ckpt_path.exists():
        raise RunError(
            f"{run_dir}: the run has no {checkpoint.CHECKPOINT_NAME} yet (it saves one at the end "
            f"of each epoch; to train it on: hardmine train --config {run_dir / CONFIG_NAME} "
            "--resume)"
        )
    config = load_run_config(run_dir / CONFIG_NAME, overrides)
    state = checkpoint.load(ckpt_path, map_location=device)
    if "model" not in state:
        raise CheckpointError(f"{ckpt_path}: not a checkpoint of hardmine train (no weights)")
    train_set, val_set, categories = build_datasets(config)
    trained_on = state.get("categories")
    if trained_on is not None and list(trained_on) != list(categories):
        raise RunError(
            f"{run_dir} was trained on the categories {list(trained_on)}; the data given has "
            f"{list(categories)}: a detector reads only data with its own categories"
        )
    model = build_detector(config, len(categories))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:  # load_state_dict's mismatch report runs to hundreds of lines
        raise CheckpointError(
            f"{ckpt_path}: its weights do not fit {config.model.name} with {len(categories)} "
            f"classes ({str(error).splitlines()[0].rstrip(':.')}); was the data or the model "
            "changed?"
        ) from error
    return LoadedRun(
        run_dir=run_dir,
        config=config,
        model=model.to(device).eval(),
        train_set=train_set,
        val_set=val_set,
        categories=categories,
        step=int(state.get("position", {}).get("step", 0)),
    )
