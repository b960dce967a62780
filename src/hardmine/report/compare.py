"""Comparing samplers and assigners: train each method over seeds, then report AP and losses.

Each (method, seed) trains in a run directory of its own, ``OUT/<method>/seed<k>``. A run that
finished (it has ``results.json``) is not trained again, a run that was interrupted is resumed,
and a run that crashes is recorded (``error.txt``) and reported without stopping the others. The
report, ``OUT/report.md``, gives AP / AP50 / AP75 per method as mean ± standard deviation over
seeds and the difference to the method's baseline (random sampling; max-IoU for ATSS), paired by
seed: two runs with the same seed share the initial weights and the data order.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hardmine._atomic import write_atomic
from hardmine.config import (
    RunConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    describe_differences,
    differences,
    save_config,
)
from hardmine.engine.build import RUN_REGISTRIES, load_run_config
from hardmine.engine.distributed import resolve_device
from hardmine.engine.rundir import (
    CONFIG_NAME,
    METRICS_NAME,
    RESULTS_NAME,
    loss_curve,
    plot_loss_curves,
    read_metrics,
)
from hardmine.engine.train import train
from hardmine.errors import RunError
from hardmine.report.inspect import inspect_run
from hardmine.report.jobs import Slot, Task, run_jobs
from hardmine.report.plots import AP_KEYS, mean_curve, plot_ap_bars

log = logging.getLogger(__name__)
REPORT_NAME = "report.md"
ERROR_NAME = "error.txt"


@dataclass(frozen=True)
class Method:
    """One detector / sampler / assigner combination of a comparison.

    Attributes:
        name: the label in the report and the run directory's name.
        model: the ``model`` section (name and settings), replacing the base configuration's.
        sampler: the ``sampler`` section; None for detectors without one (RetinaNet).
        assigner: the ``assigner`` section; None for the detector's own.
        baseline: the method this one is measured against; None for a baseline.
        overrides: dotted keys set last, over the sections and the comparison's own overrides:
            a variant's settings (``sampler.strategy``, ``model.box_nms_thresh``, ``train.lr``;
            ``hardmine.report.methods.parse_method``).
    """

    name: str
    model: Mapping[str, Any]
    sampler: Mapping[str, Any] | None = None
    assigner: Mapping[str, Any] | None = None
    baseline: str | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def config(
        self,
        base: RunConfig,
        *,
        seed: int,
        output_dir: Path,
        overrides: Mapping[str, Any] | None = None,
    ) -> RunConfig:
        """``base`` with this method's sections, ``seed`` and ``output_dir``.

        Args:
            base: the configuration every method starts from.
            seed: the run's seed.
            output_dir: the run directory.
            overrides: dotted keys in the component sections (``model.min_size``,
                ``sampler.num``) set on top of the method's sections; those in a section the
                method leaves empty (a sampler for RetinaNet) do not apply to it. The method's
                own ``overrides`` come after them.
        """
        sections = {"model": self.model, "sampler": self.sampler, "assigner": self.assigner}
        applicable = {
            key: value
            for key, value in (overrides or {}).items()
            if sections.get(key.split(".")[0]) is not None
        }
        raw = apply_overrides(
            config_to_dict(base), sections | {"seed": seed, "output_dir": str(output_dir)}
        )
        raw = apply_overrides(apply_overrides(raw, applicable), self.overrides)
        return config_from_dict(raw, registries=RUN_REGISTRIES)


# The same RoI budget (128 per image, torchvision's tiny Faster R-CNN setting) for every sampler.
_RCNN = {"name": "faster_rcnn_tiny"}
# ATSS against max-IoU on the same detector (one square anchor per location), as in the ATSS
# paper's comparison; max-IoU with RetinaNet's thresholds (positive >= 0.5, negative < 0.4).
_ONE_ANCHOR = {"name": "atss_tiny"}
DEFAULT_METHODS: tuple[Method, ...] = (
    Method("random", _RCNN, {"name": "random", "num": 128}),
    Method("ohem", _RCNN, {"name": "ohem", "num": 128}, baseline="random"),
    Method("iou_balanced", _RCNN, {"name": "iou_balanced", "num": 128}, baseline="random"),
    Method("overlap", _RCNN, {"name": "overlap", "num": 128}, baseline="random"),
    Method(
        "retinanet_max_iou",
        _ONE_ANCHOR,
        assigner={"name": "max_iou", "pos_thr": 0.5, "neg_thr": 0.4, "low_quality": True},
    ),
    Method(
        "retinanet_atss",
        _ONE_ANCHOR,
        assigner={"name": "atss", "topk": 9},
        baseline="retinanet_max_iou",
    ),
)


def default_compare_base() -> RunConfig:
    """The default comparison's base: the built-in scenes, 384 steps a run (about a minute for
    the tiny Faster R-CNN on two CPU cores)."""
    return config_from_dict(
        {
            "data": {"kind": "scenes", "num_train": 256, "num_val": 64, "batch_size": 4},
            "train": {"epochs": 6, "lr": 0.02, "warmup_steps": 50, "log_every": 8, "eval_every": 3},
            "device": "auto",
        },
        registries=RUN_REGISTRIES,
    )


@dataclass
class Outcome:
    """One (method, seed) run of a comparison.

    Attributes:
        method: the method's name.
        seed: the run's seed.
        run_dir: its run directory.
        metrics: final COCO metrics; empty if the run failed.
        seconds: training time of the run (0 if unknown).
        error: the failure's last line, or None.
    """

    method: str
    seed: int
    run_dir: Path
    metrics: dict[str, float | None] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None


def run_comparison(
    base: RunConfig,
    methods: Sequence[Method],
    seeds: Sequence[int],
    out_dir: str | Path,
    *,
    overrides: Mapping[str, Any] | None = None,
    slots: Sequence[Slot] | None = None,
) -> list[Outcome]:
    """Train every method with every seed, each in its own run directory under ``out_dir``.

    Every run's configuration is made first, so that a bad setting is refused before any
    training. Finished runs are read, not trained again; interrupted ones resume. A run whose
    directory holds a different configuration (``hardmine.config.differences``, named in the
    error), or that raises, is recorded as failed (with the traceback in its ``error.txt``) and the
    comparison goes on.

    With ``slots`` (``hardmine.report.jobs.make_slots``: ``--jobs`` / ``--devices``) the runs
    train side by side, each in a process of its own (``hardmine.report.jobs``); what they write,
    how a failure is recorded and what is returned are the same as in this process, one after
    another.

    Args:
        base: the configuration every method starts from.
        methods: the methods.
        seeds: the seeds each method trains with.
        out_dir: the comparison's folder.
        overrides: dotted keys of the model / sampler / assigner sections for every method that
            has that section (``Method.config``).
        slots: train in processes, one per slot at a time; None: here, one after another.

    Returns:
        One ``Outcome`` per run, methods in order, seeds in order within each.

    Raises:
        ConfigError: a method's configuration is invalid (an override out of range for it).
    """
    configs = _run_configs(base, methods, seeds, Path(out_dir), overrides)
    outcomes: dict[tuple[str, int], Outcome] = {}
    queued: list[Task] = []
    for (name, seed), config in configs.items():
        run_dir = Path(config.output_dir)
        outcome = outcomes[name, seed] = Outcome(name, seed, run_dir)
        try:
            _check_same_run(config, run_dir)
            if (run_dir / RESULTS_NAME).exists():
                log.info("%s, seed %d: finished before, read from %s", name, seed, run_dir)
            else:
                (run_dir / ERROR_NAME).unlink(missing_ok=True)
                if slots is not None:
                    log.info("%s, seed %d: to train in %s", name, seed, run_dir)
                    queued.append(((name, seed), train_run, (config,), run_dir))
                    continue
                log.info("%s, seed %d: training in %s", name, seed, run_dir)
                train(config, resume=True)
            _read_results(outcome)
        except Exception as error:  # one method's failure must not stop the others
            _record_failure(outcome, f"{type(error).__name__}: {error}", traceback.format_exc())
    if queued:
        log.info("%d runs to train, %d at a time", len(queued), len(slots or ()))
        for result in run_jobs(queued, slots or ()):
            outcome = outcomes[result.key]  # type: ignore[index]
            if result.error is not None:
                _record_failure(outcome, result.error, result.traceback or result.error)
                continue
            try:
                _read_results(outcome)
            except Exception as error:
                _record_failure(outcome, f"{type(error).__name__}: {error}", traceback.format_exc())
    return list(outcomes.values())


def _run_configs(
    base: RunConfig,
    methods: Sequence[Method],
    seeds: Sequence[int],
    out_dir: Path,
    overrides: Mapping[str, Any] | None,
) -> dict[tuple[str, int], RunConfig]:
    """Every run's configuration, by (method, seed), methods in order and seeds within each."""
    return {
        (method.name, seed): method.config(
            base,
            seed=seed,
            output_dir=out_dir / method.name / f"seed{seed}",
            overrides=overrides,
        )
        for method in methods
        for seed in seeds
    }


def train_run(config: RunConfig) -> None:
    """Train (or resume) one run of a comparison: what a ``--jobs`` process runs."""
    train(config, resume=True)


def _read_results(outcome: Outcome) -> None:
    """Fill ``outcome`` from its run's ``results.json``."""
    results = json.loads((outcome.run_dir / RESULTS_NAME).read_text())
    outcome.metrics, outcome.seconds = results["metrics"], results["seconds"]
    ap = outcome.metrics.get("AP")
    log.info(
        "%s, seed %d: AP %s, %.1f min",
        outcome.method,
        outcome.seed,
        "n/a" if ap is None else f"{100 * ap:.1f}",
        outcome.seconds / 60,
    )


def _record_failure(outcome: Outcome, error: str, text: str) -> None:
    """Mark ``outcome`` failed with ``error`` (its first line) and keep ``text`` (the traceback)
    in its run's ``error.txt``."""
    outcome.run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(outcome.run_dir / ERROR_NAME, text)
    outcome.error = error.splitlines()[0] if error else error
    log.warning("%s, seed %d: failed: %s", outcome.method, outcome.seed, outcome.error)


def plan_comparison(
    base: RunConfig,
    methods: Sequence[Method],
    seeds: Sequence[int],
    out_dir: str | Path,
    *,
    overrides: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write the ``config.yaml`` of every run not finished yet, for training elsewhere.

    For runs that are DDP jobs of their own (``torchrun ... hardmine train --config
    RUN/config.yaml --resume``, or a cluster's scheduler): train them so, then call
    ``hardmine compare`` with the same arguments, which reads the finished runs and writes the
    report. A run directory holding another configuration is refused, as ``run_comparison``
    would record it.

    Returns:
        The configuration files written (or already there), in run order.

    Raises:
        RunError: a run directory holds another configuration.
    """
    paths = []
    for config in _run_configs(base, methods, seeds, Path(out_dir), overrides).values():
        run_dir = Path(config.output_dir)
        _check_same_run(config, run_dir)
        if (run_dir / RESULTS_NAME).exists():
            continue
        if not (run_dir / CONFIG_NAME).exists():
            save_config(config, run_dir / CONFIG_NAME)
        paths.append(run_dir / CONFIG_NAME)
    return paths


def _check_same_run(config: RunConfig, run_dir: Path) -> None:
    saved = run_dir / CONFIG_NAME
    if not saved.exists():
        return
    changes = differences(load_run_config(saved), config)
    if changes:
        raise RunError(
            f"{run_dir} holds a run of another configuration ({describe_differences(changes)}); "
            "delete it or choose another output folder"
        )


@dataclass(frozen=True)
class Summary:
    """One method's numbers over its seeds.

    Attributes:
        method: the method.
        runs: finished runs.
        failed: failed runs.
        ap: metric -> (mean, std) over the finished runs (std 0 for one run).
        delta: metric -> (mean, std) of the per-seed difference to the baseline; empty without a
            baseline or common seeds.
        picks: mean positives and negatives per image seen by the loss, over all logged steps.
        minutes: mean training time per run.
    """

    method: Method
    runs: int
    failed: int
    ap: dict[str, tuple[float, float]]
    delta: dict[str, tuple[float, float]]
    picks: tuple[float, float] | None
    minutes: float


def _measured(values: dict[str, list[float | None]]) -> dict[str, tuple[float, float]]:
    """Mean and std of each key's measured values; keys with none are left out."""
    out = {}
    for key, vs in values.items():
        measured = [v for v in vs if v is not None]
        if measured:
            out[key] = _mean_std(measured)
    return out


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(methods: Sequence[Method], outcomes: Sequence[Outcome]) -> list[Summary]:
    """Per method: AP mean ± std over seeds, the paired difference to its baseline, the picks."""
    by_method: dict[str, dict[int, Outcome]] = {}
    for o in outcomes:
        if o.error is None and set(AP_KEYS) <= o.metrics.keys():  # evaluated, finished runs
            by_method.setdefault(o.method, {})[o.seed] = o
    summaries = []
    for method in methods:
        done = by_method.get(method.name, {})
        # An AP with nothing to measure (None) is left out: of the mean, or of the table.
        ap = _measured({k: [o.metrics[k] for o in done.values()] for k in AP_KEYS})
        base = by_method.get(method.baseline or "", {})
        common = sorted(set(done) & set(base))
        delta = _measured(
            {
                k: [
                    done[s].metrics[k] - base[s].metrics[k]
                    for s in common
                    if done[s].metrics[k] is not None and base[s].metrics[k] is not None
                ]
                for k in AP_KEYS
            }
        )
        rows = [r for o in done.values() for r in read_metrics(o.run_dir / METRICS_NAME)]
        picks = [r["picks"] for r in rows if "picks" in r]
        failed = sum(o.method == method.name and o.error is not None for o in outcomes)
        summaries.append(
            Summary(
                method=method,
                runs=len(done),
                failed=failed,
                ap=ap,
                delta=delta,
                picks=(
                    (
                        statistics.fmean(p["positive"] for p in picks),
                        statistics.fmean(p["negative"] for p in picks),
                    )
                    if picks
                    else None
                ),
                minutes=statistics.fmean(o.seconds for o in done.values()) / 60 if done else 0.0,
            )
        )
    return summaries


def _pct(mean_std: tuple[float, float] | None, *, signed: bool = False, runs: int = 1) -> str:
    """``(0.123, 0.004)`` -> ``12.3 ± 0.4`` (COCO AP in percent)."""
    if mean_std is None or math.isnan(mean_std[0]):
        return "—"
    mean, std = (100 * v for v in mean_std)
    text = f"{mean:+.1f}" if signed else f"{mean:.1f}"
    return f"{text} ± {std:.1f}" if runs > 1 else text


def format_table(summaries: Sequence[Summary]) -> str:
    """The comparison as a Markdown table (AP in percent)."""
    header = [
        "method",
        "detector",
        "sampler",
        "assigner",
        *AP_KEYS,
        *(f"Δ{k}" for k in AP_KEYS),
        "vs",
        "picks +/− per image",
        "runs",
        "min/run",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        m = s.method
        paired = s.runs if s.delta else 1
        cells = [
            m.name,
            m.model["name"],
            m.sampler["name"] if m.sampler else "—",
            m.assigner["name"] if m.assigner else "—",
            *(_pct(s.ap.get(k), runs=s.runs) for k in AP_KEYS),
            *(_pct(s.delta.get(k), signed=True, runs=paired) for k in AP_KEYS),
            m.baseline or "—",
            f"{s.picks[0]:.0f} / {s.picks[1]:.0f}" if s.picks else "—",
            f"{s.runs}" + (f" ({s.failed} failed)" if s.failed else ""),
            f"{s.minutes:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(
    out_dir: str | Path,
    methods: Sequence[Method],
    outcomes: Sequence[Outcome],
    *,
    description: str,
) -> Path | None:
    """Write ``report.md``, ``ap.png`` and ``losses.png`` in ``out_dir``.

    When every run failed and ``out_dir`` holds a report already (of an earlier call), nothing is
    written: a report of failures only must not replace one with results.

    Args:
        out_dir: the comparison's folder.
        methods: the methods, in table order.
        outcomes: what ``run_comparison`` returned.
        description: a paragraph on the setting (data, schedule, seeds) for the report's head.

    Returns:
        The report's path; None when it was left as it was.
    """
    out_dir = Path(out_dir)
    if all(o.error is not None for o in outcomes) and (out_dir / REPORT_NAME).exists():
        log.warning("every run failed: %s, of an earlier call, was left as it was", out_dir)
        return None
    summaries = summarize(methods, outcomes)
    plot_ap_bars({s.method.name: s.ap for s in summaries if s.ap}, out_dir / "ap.png")
    curves = {
        m.name: mean_curve(
            [
                loss_curve(read_metrics(o.run_dir / METRICS_NAME))
                for o in outcomes
                if o.method == m.name and o.error is None
            ]
        )
        for m in methods
    }
    plot_loss_curves({k: v for k, v in curves.items() if v}, out_dir / "losses.png")
    roi_curves = {
        m.name: mean_curve(
            [
                loss_curve(read_metrics(o.run_dir / METRICS_NAME), "roi_loss")
                for o in outcomes
                if o.method == m.name and o.error is None
            ]
        )
        for m in methods
    }
    roi_curves = {k: v for k, v in roi_curves.items() if v}
    if roi_curves:
        plot_loss_curves(roi_curves, out_dir / "roi_loss.png", ylabel="mean loss over all RoIs")
    failures = [o for o in outcomes if o.error is not None]
    lines = [
        "# Sample selection: comparison",
        "",
        description,
        "",
        "COCO AP in percent, mean ± standard deviation over seeds; Δ is the difference to the "
        "method named under *vs*, paired by seed (same initial weights and data order). "
        "*picks* are the positive / negative candidates per image that the loss saw (for "
        "RetinaNet, every anchor that is not ignored). Loss curves are comparable within a "
        "detector only, and OHEM's loss is over its hardest picks, so higher by construction.",
        "",
        format_table(summaries),
        "",
        "![AP per method](ap.png)",
        "",
        "![training loss per method](losses.png)",
        "",
    ]
    if roi_curves:
        lines += [
            "The OHEM paper's sampler-independent measure: the mean loss per RoI over *all* RoIs "
            "of the training images (the RPN's training proposals and the ground truths), at "
            "each evaluation, whichever RoIs the sampler picks.",
            "",
            "![mean loss over all RoIs](roi_loss.png)",
            "",
        ]
    lines += _inspect_section(out_dir, methods, outcomes)
    if failures:
        lines += ["## Failed runs", ""]
        lines += [
            f"- {o.method}, seed {o.seed}: {o.error} ({o.run_dir / ERROR_NAME})" for o in failures
        ]
        lines.append("")
    return write_atomic(out_dir / REPORT_NAME, "\n".join(lines))


def _inspect_section(
    out_dir: Path, methods: Sequence[Method], outcomes: Sequence[Outcome]
) -> list[str]:
    """Draw what every sampler picks with the first finished R-CNN run's detector.

    A failure here costs the report its pictures, not its table: it is logged and noted.
    """
    with_sampler = {m.name for m in methods if m.sampler is not None}
    runs = [o for o in outcomes if o.method in with_sampler and o.error is None]
    if not runs:
        return []
    run = min(runs, key=lambda o: o.seed)
    folder = out_dir / "inspect"
    try:
        result = inspect_run(run.run_dir, folder, device=resolve_device("auto"))
    except Exception as error:  # a picture must not sink the comparison
        log.warning("inspect failed on %s: %s", run.run_dir, error)
        return ["## What each sampler picks", "", f"(not drawn: {error})", ""]
    sheet, hist = result.sheet.relative_to(out_dir), result.histogram_plot.relative_to(out_dir)
    csv = result.histogram_csv.relative_to(out_dir)
    return [
        "## What each sampler picks",
        "",
        f"Every sampler on the same RoIs of a few training images, with the detector of "
        f"*{run.method}* (seed {run.seed}): ground truths white, picked positives solid, picked "
        "negatives dashed, coloured by IoU with the ground truth; line width is the loss weight.",
        "",
        f"![picks per sampler]({sheet})",
        "",
        "The picked negatives' IoU with the ground truth and with the positives (IoU(p,n)), over "
        f"more training images ([counts as CSV]({csv})):",
        "",
        f"![IoU histograms]({hist})",
        "",
    ]
