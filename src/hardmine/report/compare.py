"""Comparing samplers and assigners: train each method over seeds, then report what differed.

Each (method, seed) trains in a run directory of its own, ``OUT/<method>/seed<k>``. A run that
finished (it has ``results.json``) is not trained again, a run that was interrupted is resumed,
and a run that crashes is recorded (``error.txt``) and reported without stopping the others. The
report, ``OUT/report.md``, gives AP / AP50 / AP75 per method as mean ± standard deviation over
seeds; the difference to the method's baseline (random sampling; max-IoU for ATSS), paired by seed
(two runs with the same seed share the initial weights and the data order), with its 95 %
t-interval and a verdict (``hardmine.report.stats``); where each method's AP goes, by TIDE's error
types (``hardmine.report.run_errors``); on the built-in scenes, what they held; the training
curves; and what each sampler picks (``hardmine.report.inspect``).
"""

from __future__ import annotations

import json
import logging
import statistics
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchvision.models.detection import FCOS, RetinaNet

from hardmine._atomic import check_writable, hold_folder, write_atomic
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
from hardmine.engine.checkpoint import CHECKPOINT_NAME
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
from hardmine.errors import ConfigError, RunError
from hardmine.models import DETECTORS
from hardmine.report.draw import MIN_IOU_PN
from hardmine.report.inspect import inspect_run
from hardmine.report.jobs import Slot, Task, run_jobs
from hardmine.report.plots import AP_KEYS, mean_curve, plot_curves, plot_results
from hardmine.report.run_errors import errors_section, facts_section, method_errors
from hardmine.report.stats import (
    Interval,
    Verdict,
    format_interval,
    format_mean_std,
    paired_difference,
    t_interval,
    verdict,
)

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
        epochs_scale: trains this many times the base configuration's epochs (a detector whose
            steps are cheap can learn longer within the same budget; compared only with methods
            of the same scale).
        lr_scale: trains at this multiple of the base configuration's learning rate (a detector
            that the base's rate makes unstable; compared only with methods of the same scale).
        grad_clip: clips this method's gradients to this 2-norm (``train.grad_clip``) where the
            base configuration does not clip; a base's own ``train.grad_clip`` applies instead.
        overrides: dotted keys set last, over the sections and the comparison's own overrides:
            a variant's settings (``sampler.strategy``, ``model.box_nms_thresh``, ``train.lr``;
            ``hardmine.report.methods.parse_method``).
    """

    name: str
    model: Mapping[str, Any]
    sampler: Mapping[str, Any] | None = None
    assigner: Mapping[str, Any] | None = None
    baseline: str | None = None
    epochs_scale: int = 1
    lr_scale: float = 1.0
    grad_clip: float | None = None
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
        own = sections | {"seed": seed, "output_dir": str(output_dir)}
        if self.epochs_scale != 1:
            own["train.epochs"] = base.train.epochs * self.epochs_scale
        if self.lr_scale != 1:
            own["train.lr"] = base.train.lr * self.lr_scale
        if self.grad_clip is not None and base.train.grad_clip is None:
            own["train.grad_clip"] = self.grad_clip
        raw = apply_overrides(config_to_dict(base), own)
        raw = apply_overrides(apply_overrides(raw, applicable), self.overrides)
        return config_from_dict(raw, registries=RUN_REGISTRIES)


# The same RoI budget (128 per image, torchvision's tiny Faster R-CNN setting) for every sampler.
_RCNN = {"name": "faster_rcnn_tiny"}
# ATSS against max-IoU on the same detector (one square anchor per location), as in the ATSS
# paper's comparison; max-IoU with RetinaNet's thresholds (positive >= 0.5, negative < 0.4).
# Twice the epochs: a step of the tiny RetinaNet costs about half of the tiny Faster R-CNN's, and
# with the R-CNN's steps it has not converged (on 512 scenes, AP50 31 / 38 for ATSS / max-IoU
# after 384 steps, seed to seed ± 10; 67 / 77 after 768). Its gradients clipped to a 2-norm of 1
# (``train.grad_clip``): unclipped, its loss jumps back up mid-run in some seeds, and its AP varied
# from seed to seed by 5-8 points at the R-CNN's lr 0.02 and 2.2 at half of it. Measured on the
# 4-epoch base (8 for these rows), one thread per run, 3 seeds, AP max-IoU / ATSS: lr 0.01
# unclipped 43.3 ± 2.2 / 46.8 ± 1.2; lr 0.02 clipped at 1, 57.7 ± 0.3 / 57.1 ± 1.0.
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
        epochs_scale=2,
        grad_clip=1.0,
    ),
    Method(
        "retinanet_atss",
        _ONE_ANCHOR,
        assigner={"name": "atss", "topk": 9},
        baseline="retinanet_max_iou",
        epochs_scale=2,
        grad_clip=1.0,
    ),
)


def default_compare_base() -> RunConfig:
    """The default comparison's base: the built-in scenes (448 training, 256 validation images
    of 128 px), 4 epochs of 112 steps of 4 images.

    Chosen so that every detector learns the scenes within the budget of ``make compare`` (about 15
    minutes for 6 methods x 3 seeds on two CPU cores, the RetinaNet rows with twice the epochs and
    their gradients clipped, ``DEFAULT_METHODS``): the
    warm-up ends after 50 of the 448 steps, the learning rate drops tenfold at 8/12 and 11/12 of the
    run (MMDetection's 1x shape, ``TrainConfig``'s default; Detectron's 1x, which the Overlap
    Sampler paper uses, decays at 2/3 and 8/9), and the one evaluation at the end is on 256 images.
    The fourth epoch is what brought the seed-to-seed standard deviation of the R-CNN rows' AP under
    1 point (measured, 3 seeds, one thread per run: 3 epochs 1.0 / 1.2 / 1.1 / 0.3 for random /
    OHEM / IoU-balanced / Overlap, 4 epochs 0.6 / 0.3 / 0.3 / 1.0, each row about 5 AP higher).
    The spread is in the trained models, not in the measurement: evaluated on 1024 validation
    images instead of 256, the same checkpoints varied as much from seed to seed.
    """
    return config_from_dict(
        {
            "data": {"kind": "scenes", "num_train": 448, "num_val": 256, "batch_size": 4},
            "train": {
                "epochs": 4,
                "lr": 0.02,
                "warmup_steps": 50,
                "log_every": 16,
                "eval_every": 4,
            },
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
        components: what the run's resolved configuration names, after every override:
            ``{"model": ..., "sampler": ..., "assigner": ...}`` (``run_comparison`` fills it;
            empty when unknown, and the table then reads the method's sections).
    """

    method: str
    seed: int
    run_dir: Path
    metrics: dict[str, float | None] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None
    components: dict[str, str] = field(default_factory=dict)


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
    check_writable(out_dir, f"--output {out_dir}")
    configs = _run_configs(base, methods, seeds, Path(out_dir), overrides)
    outcomes: dict[tuple[str, int], Outcome] = {}
    queued: list[Task] = []
    for (name, seed), config in configs.items():
        run_dir = Path(config.output_dir)
        outcome = outcomes[name, seed] = Outcome(name, seed, run_dir)
        outcome.components = resolved_components(config)
        try:
            _check_same_run(config, run_dir)
            if (run_dir / RESULTS_NAME).exists():
                log.info("%s, seed %d: finished before, read from %s", name, seed, run_dir)
            else:
                (run_dir / ERROR_NAME).unlink(missing_ok=True)
                if slots is not None:
                    started = (run_dir / CHECKPOINT_NAME).exists()
                    what = "to resume from its checkpoint" if started else "to train"
                    log.info("%s, seed %d: %s in %s", name, seed, what, run_dir)
                    queued.append(((name, seed), train_run, (config,), run_dir))
                    continue
                log.info("%s, seed %d: training in %s", name, seed, run_dir)
                train_run(config)
            _read_results(outcome)
        except Exception as error:  # one method's failure must not stop the others
            _record_failure(outcome, f"{type(error).__name__}: {error}", traceback.format_exc())
    if queued:
        at_once = min(len(slots or ()), len(queued))
        log.info("%s to train, %d at a time", _plural(len(queued), "run"), at_once)
        for done, result in enumerate(run_jobs(queued, slots or ()), start=1):
            log.info("%d of %d runs ended", done, len(queued))  # the terminal's only progress
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
    """Every run's configuration, by (method, seed), methods in order and seeds within each.

    Raises:
        ConfigError: a method's configuration is invalid, or trains without evaluation
            (``train.eval_every`` 0): the comparison is of the runs' AP.
    """
    configs = {
        (method.name, seed): method.config(
            base,
            seed=seed,
            output_dir=out_dir / method.name / f"seed{seed}",
            overrides=overrides,
        )
        for method in methods
        for seed in seeds
    }
    unevaluated = [name for (name, _), c in configs.items() if not c.train.eval_every]
    if unevaluated:
        variants = [m.name for m in methods if "train.eval_every" in m.overrides]
        named = [n for n in unevaluated if n in variants]
        # Named where a variant set it; where every run has it, it is the comparison's own.
        if named:
            where = f"--methods {named[0]}: "
        elif len(unevaluated) < len(configs):
            where = f"{unevaluated[0]}: "
        else:
            where = ""
        raise ConfigError(
            f"{where}train.eval_every 0 trains without evaluation, and the comparison is of each "
            "run's AP: give 1 or more (the runs are evaluated at the end whatever it is)"
        )
    return configs


def resolved_components(config: RunConfig) -> dict[str, str]:
    """The model, sampler and assigner a run's resolved configuration names.

    A detector without a sampler (RetinaNet, FCOS) shows none, whatever the base configuration's
    ``sampler`` section says; an assigner left to the detector shows none.
    """
    model = config.model.name or "—"
    returns = getattr(DETECTORS.get(model), "__annotations__", {}).get("return")
    dense = isinstance(returns, type) and issubclass(returns, RetinaNet | FCOS)
    sampler = "—" if dense else config.sampler.name or "—"
    return {"model": model, "sampler": sampler, "assigner": config.assigner.name or "—"}


def _method_components(method: Method) -> dict[str, str]:
    """What a method's own sections and dotted overrides name (when no run says it)."""

    def name(section: str, given: Mapping[str, Any] | None) -> str:
        value = method.overrides.get(f"{section}.name", (given or {}).get("name"))
        return str(value) if value is not None else "—"

    sampler = name("sampler", method.sampler)
    return {
        "model": name("model", method.model),
        "sampler": sampler
        if method.sampler is not None or "sampler.name" in method.overrides
        else "—",
        "assigner": name("assigner", method.assigner),
    }


def train_run(config: RunConfig) -> None:
    """Train (or resume) one run of a comparison, here or in a ``--jobs`` process, holding its
    run directory (``hold_folder``: a ``hardmine train`` of the same run at the same time)."""
    run_dir = config.output_dir
    with hold_folder(run_dir, f"output_dir {run_dir}", "hardmine train or compare"):
        train(config, resume=True)


def _read_results(outcome: Outcome) -> None:
    """Fill ``outcome`` from its run's ``results.json``."""
    results = json.loads((outcome.run_dir / RESULTS_NAME).read_text())
    if "AP" not in results["metrics"]:  # trained by hand with train.eval_every 0
        raise RunError(
            f"{outcome.run_dir}: this run finished without an evaluation (train.eval_every 0), "
            "so it has no AP to compare: delete its folder, and the comparison trains it again"
        )
    outcome.metrics, outcome.seconds = results["metrics"], results["seconds"]
    log.info(
        "%s, seed %d: AP %.1f, %.1f min",
        outcome.method,
        outcome.seed,
        100 * outcome.metrics["AP"],
        outcome.seconds / 60,
    )


def _record_failure(outcome: Outcome, error: str, text: str) -> None:
    """Mark ``outcome`` failed with ``error`` (its first line) and keep ``text`` (the traceback)
    in its run's ``error.txt``.

    It never raises: a run folder that cannot hold ``error.txt`` (the reason the run failed, as
    often as not) is said in the warning, and the comparison goes on to its report.
    """
    outcome.error = error.splitlines()[0] if error else error
    kept = ""
    try:
        write_atomic(outcome.run_dir / ERROR_NAME, text)
    except OSError as failure:
        kept = f" (its traceback was not kept: {failure.strerror or failure})"
    log.warning("%s, seed %d: failed: %s%s", outcome.method, outcome.seed, outcome.error, kept)


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
        ap: metric -> mean, standard deviation and 95 % t-interval over the finished runs.
        delta: metric -> the same of the per-seed difference to the baseline (``report.stats``);
            empty without a baseline or common seeds.
        verdict: what ``delta["AP"]``'s interval says (better / worse / no detectable
            difference); None for a baseline.
        seeds: seed -> the run's metrics, for plots.
        picks: mean positives and negatives per image seen by the loss, over all logged steps.
        minutes: mean training time per run.
        components: the model, sampler and assigner that ran (the runs' resolved
            configurations; the method's sections with its overrides when no run says).
    """

    method: Method
    runs: int
    failed: int
    ap: dict[str, Interval]
    delta: dict[str, Interval]
    verdict: Verdict | None
    seeds: dict[int, dict[str, float]]
    picks: tuple[float, float] | None
    minutes: float
    components: dict[str, str] = field(default_factory=dict)


#: The metric whose paired interval decides a row's verdict: COCO's primary AP.
VERDICT_METRIC = "AP"


def summarize(methods: Sequence[Method], outcomes: Sequence[Outcome]) -> list[Summary]:
    """Per method: AP over seeds, the paired difference to its baseline with its 95 %
    t-interval and verdict (``hardmine.report.stats``), the picks."""
    by_method: dict[str, dict[int, Outcome]] = {}
    for o in outcomes:
        if o.error is None and set(AP_KEYS) <= o.metrics.keys():  # evaluated, finished runs
            by_method.setdefault(o.method, {})[o.seed] = o
    summaries = []
    for method in methods:
        done = by_method.get(method.name, {})
        # An AP with nothing to measure (None, COCO's -1) is left out: of the interval, or of the
        # table.
        measured = {
            k: {s: o.metrics[k] for s, o in done.items() if o.metrics.get(k) is not None}
            for k in AP_KEYS
        }
        ap = {k: t_interval(list(v.values())) for k, v in measured.items() if v}
        base = by_method.get(method.baseline or "", {})
        delta: dict[str, Interval] = {}
        for k in AP_KEYS:
            diff = paired_difference(
                measured[k],
                {s: o.metrics[k] for s, o in base.items() if o.metrics.get(k) is not None},
            )
            if diff is not None:
                delta[k] = diff
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
                verdict=verdict(delta[VERDICT_METRIC]) if VERDICT_METRIC in delta else None,
                seeds={s: dict(o.metrics) for s, o in sorted(done.items())},
                picks=(
                    (
                        statistics.fmean(p["positive"] for p in picks),
                        statistics.fmean(p["negative"] for p in picks),
                    )
                    if picks
                    else None
                ),
                minutes=statistics.fmean(o.seconds for o in done.values()) / 60 if done else 0.0,
                components=next(
                    (o.components for o in outcomes if o.method == method.name and o.components),
                    _method_components(method),
                ),
            )
        )
    return summaries


def format_table(summaries: Sequence[Summary]) -> str:
    """The comparison as a Markdown table: AP in percent as mean ± std over seeds; differences
    to the baseline as mean [95 % interval], paired by seed; the verdict on ΔAP."""
    header = [
        "method",
        "detector",
        "sampler",
        "assigner",
        *AP_KEYS,
        "vs",
        *(f"Δ{k} [95% CI]" for k in DELTA_KEYS),
        "verdict",
        "picks +/− per image",
        "runs",
        "min/run",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        m = s.method
        cells = [
            m.name,
            # What ran: the resolved configuration, dotted overrides included
            # (``random:sampler.name=ohem`` shows ohem).
            s.components.get("model", "—"),
            s.components.get("sampler", "—"),
            s.components.get("assigner", "—"),
            *(format_mean_std(s.ap[k]) if k in s.ap else "—" for k in AP_KEYS),
            m.baseline or "—",
            *(
                format_interval(s.delta[k], signed=True) if k in s.delta else "—"
                for k in DELTA_KEYS
            ),
            s.verdict or "—",
            f"{s.picks[0]:.0f} / {s.picks[1]:.0f}" if s.picks else "—",
            f"{s.runs}" + (f" ({s.failed} failed)" if s.failed else ""),
            f"{s.minutes:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: The differences the table shows with their intervals.
DELTA_KEYS = ("AP", "AP50")

STATISTICS_NOTE = (
    "COCO AP in percent: mean ± standard deviation over seeds. Δ is the difference to the "
    "method named under *vs*, paired by seed (two runs with one seed share the initial weights "
    "and the order of the data): the mean of the per-seed differences and, in brackets, its 95 % "
    "t-interval, d̄ ± t(0.975, n−1) · s_d / √n over the n seeds. The interval describes the "
    "seed-to-seed variation of training on this validation set, not the sampling of the "
    "validation images. *verdict* reads the ΔAP interval: **better** if it lies above 0, "
    "**worse** below, otherwise **no detectable difference** at this budget (an effect smaller "
    "than about half the interval's width could be hiding). Verdicts are not corrected for "
    "multiple comparisons. *picks* are the positive / negative candidates per image that the "
    "loss saw (for RetinaNet, every anchor that is not ignored)."
)


def describe(
    config: RunConfig,
    seeds: Sequence[int],
    *,
    steps_per_epoch: int | None = None,
    slots: Sequence[Slot] | None = None,
) -> str:
    """A paragraph on a comparison's setting: data, schedule, seeds and the device used.

    Args:
        config: the base configuration.
        seeds: the seeds.
        steps_per_epoch: shown when known.
        slots: the processes the runs trained in (``--jobs`` / ``--devices``); None: in this one.
    """
    data, train_cfg = config.data, config.train
    if data.kind == "scenes":
        where = (
            f"the built-in scenes ({data.num_train} training / {data.num_val} validation images, "
            f"{data.image_size} px, {_plural(data.num_classes, 'class', 'classes')})"
        )
    else:
        where = f"COCO data ({data.root or data.train_ann})"
    schedule = _plural(train_cfg.epochs, "epoch")
    clip = ""
    if train_cfg.grad_clip is not None:
        clip = f", gradients clipped to a 2-norm of {train_cfg.grad_clip:g}"
    if steps_per_epoch is not None:
        schedule += f" ({_plural(train_cfg.epochs * steps_per_epoch, 'step')})"
    return (
        f"Data: {where}. Schedule: {schedule}, {_plural(data.batch_size, 'image')} per step, "
        f"SGD lr {train_cfg.lr:g}, {_plural(train_cfg.warmup_steps, 'warm-up step')}, decay "
        f"×{train_cfg.gamma:g} at {', '.join(f'{f:.0%}' for f in train_cfg.decay_at)} of the "
        f"steps{clip}. Seeds: {', '.join(map(str, seeds))}. "
        f"Device: {_devices(config.device, slots)}."
    )


def _devices(device: str, slots: Sequence[Slot] | None) -> str:
    """``device_name`` of the runs: each process's threads, and how many ran at a time."""
    if not slots:
        return device_name(device)
    if any(s.device is not None for s in slots):
        names = ", ".join(f"cuda:{s.device}" for s in slots)
        return f"{device_name(device)}; one run at a time on each of {names}"
    return device_name(device, threads=slots[0].threads, at_once=len(slots))


def _plural(count: int, singular: str, plural: str | None = None) -> str:
    """``1 epoch``, ``2 epochs``."""
    return f"{count} {singular if count == 1 else plural or singular + 's'}"


def device_name(device: str, *, threads: int | None = None, at_once: int = 1) -> str:
    """The device a setting resolves to, by name: ``CPU (2 threads)``, ``NVIDIA H200 (cuda:0)``,
    with the setting when it was ``auto``; ``threads``: the CPU threads of each run if not this
    process's, ``at_once`` runs side by side (``CPU (1 thread per run, 2 runs at a time)``)."""
    import torch

    resolved = resolve_device(device)
    if resolved.type == "cuda":
        index = resolved.index if resolved.index is not None else torch.cuda.current_device()
        name = f"{torch.cuda.get_device_name(index)} (cuda:{index})"
    elif resolved.type == "cpu":
        name = f"CPU ({_plural(threads or torch.get_num_threads(), 'thread')})"
        if at_once > 1:
            name = f"{name[:-1]} per run, {at_once} runs at a time)"
    else:
        name = str(resolved)
    return f"{name}, chosen by device: auto" if device == "auto" else name


def _scaled_note(methods: Sequence[Method], base: RunConfig) -> str:
    """A sentence naming the methods whose runs train another schedule than ``base``'s, if any:
    their epochs, learning rate or gradient clip, as each method resolves them (a variant's own
    ``train.*`` settings, and a base's own clip, included)."""

    def scales(m: Method) -> str:
        own, ref = m.config(base, seed=0, output_dir=Path(".")).train, base.train
        parts = []
        if own.epochs != ref.epochs:
            scaled = own.epochs == ref.epochs * m.epochs_scale
            parts.append(f"{m.epochs_scale}× the epochs" if scaled else f"{own.epochs} epochs")
        if own.lr != ref.lr:
            scaled = own.lr == ref.lr * m.lr_scale
            parts.append(f"{m.lr_scale:g}× the learning rate" if scaled else f"lr {own.lr:g}")
        if own.grad_clip != ref.grad_clip:
            clip = own.grad_clip
            parts.append(f"gradients clipped to a 2-norm of {clip:g}" if clip else "no clipping")
        return ", ".join(parts)

    named = ((m.name, scales(m)) for m in methods)
    names = ", ".join(f"{name} ({what})" for name, what in named if what)
    return f" These train another schedule than *Schedule*'s: {names}." if names else ""


def _curves(
    methods: Sequence[Method], outcomes: Sequence[Outcome], key: str
) -> dict[str, dict[int, float]]:
    """Method -> the mean over its finished seeds of ``key`` against step, for methods with any."""
    curves = {
        m.name: mean_curve(
            [
                loss_curve(read_metrics(o.run_dir / METRICS_NAME), key)
                for o in outcomes
                if o.method == m.name and o.error is None
            ]
        )
        for m in methods
    }
    return {k: v for k, v in curves.items() if v}


def _ap_curves(methods: Sequence[Method], outcomes: Sequence[Outcome]) -> dict[str, dict]:
    """Method -> step -> mean AP50 (percent) over seeds at each evaluation: learning curves."""
    curves = {}
    for m in methods:
        runs = []
        for o in outcomes:
            if o.method == m.name and o.error is None:
                rows = read_metrics(o.run_dir / METRICS_NAME)
                runs.append({r["step"]: 100 * r["eval"]["AP50"] for r in rows if "eval" in r})
        curve = mean_curve([r for r in runs if r])
        if curve:
            curves[m.name] = curve
    return curves


def write_report(
    out_dir: str | Path,
    methods: Sequence[Method],
    outcomes: Sequence[Outcome],
    *,
    description: str,
    base: RunConfig | None = None,
) -> Path | None:
    """Write ``report.md`` and its figures in ``out_dir``.

    Figures: ``ap.png`` (AP per method, the paired differences with their intervals, and the
    error breakdown beside them), ``losses.png`` (training loss), ``roi_loss.png`` (the mean
    loss over all RoIs at every epoch), ``ap_curves.png`` (AP50 at each evaluation) and the
    pictures of what each sampler picks (``inspect/``).

    When every run failed and ``out_dir`` holds a report already (of an earlier call), nothing is
    written: a report of failures only must not replace one with results.

    Args:
        out_dir: the comparison's folder.
        methods: the methods, in table order.
        outcomes: what ``run_comparison`` returned.
        description: a paragraph on the setting (data, schedule, seeds) for the report's head.
        base: the comparison's base configuration, whose schedule ``description`` gives (the
            methods that train another are named); ``default_compare_base()`` when None.

    Returns:
        The report's path; None when it was left as it was.
    """
    out_dir = Path(out_dir)
    if all(o.error is not None for o in outcomes) and (out_dir / REPORT_NAME).exists():
        return None  # the caller says so (the CLI in one line)
    summaries = summarize(methods, outcomes)
    finished = [o for o in outcomes if o.error is None and o.metrics]
    errors = method_errors(
        {m.name: [o.run_dir for o in finished if o.method == m.name] for m in methods}
    )
    plot_results(
        {s.method.name: s.seeds for s in summaries if s.seeds},
        {
            s.method.name: (s.method.baseline, s.delta[VERDICT_METRIC])
            for s in summaries
            if VERDICT_METRIC in s.delta and s.method.baseline
        },
        {
            name: e.delta | {f"bkg: {k}": v for k, v in e.background_delta.items()}
            for name, e in errors.items()
        },
        out_dir / "ap.png",
    )
    plot_loss_curves(_curves(methods, outcomes, "loss"), out_dir / "losses.png")
    roi_curves = _curves(methods, outcomes, "roi_loss")
    if roi_curves:
        plot_loss_curves(roi_curves, out_dir / "roi_loss.png", ylabel="mean loss over all RoIs")
    ap_curves = _ap_curves(methods, outcomes)
    if not any(len(curve) > 1 for curve in ap_curves.values()):
        ap_curves = {}  # one evaluation per run: no curve to draw
    if ap_curves:
        plot_curves(ap_curves, out_dir / "ap_curves.png", ylabel="AP50 (%) on the validation set")
    failures = [o for o in outcomes if o.error is not None]
    lines = [
        "# Sample selection: comparison",
        "",
        description,
        "",
        *(facts_section(finished[0].run_dir) if finished else []),
        "## Results",
        "",
        STATISTICS_NOTE,
        "",
        format_table(summaries),
        "",
        f"Training and evaluation took {sum(o.seconds for o in finished) / 60:.1f} min in all "
        f"({len(finished)} runs).{_scaled_note(methods, base or default_compare_base())}",
        "",
        "![AP per method, paired differences and where the AP goes](ap.png)",
        "",
    ]
    lines += errors_section(errors)
    lines += [
        "## Training",
        "",
        "Loss curves are comparable within a detector only, and OHEM's loss is over its hardest "
        "picks, so higher by construction.",
        "",
        "![training loss per method](losses.png)",
        "",
    ]
    if ap_curves:
        lines += ["![AP50 at each evaluation](ap_curves.png)", ""]
    if roi_curves:
        lines += [
            "The OHEM paper's sampler-independent measure (Sec. 5.5, Fig. 3): the mean loss per "
            "RoI over *all* RoIs of the training images (the RPN's training proposals and the "
            "ground truths) at the end of every epoch, whichever RoIs the sampler picks; labelled "
            "by one rule (IoU >= 0.5 foreground) and scored with smooth-L1 beta 1/9 in float32 "
            "for every run. Each run's proposals are its own RPN's, so the RoI set is not the "
            "same across runs (the paper's fixed proposals were).",
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
    overlaps = result.overlaps.relative_to(out_dir)
    csv = result.histogram_csv.relative_to(out_dir)
    return [
        "## What each sampler picks",
        "",
        f"Every sampler on the same RoIs of a few training images (each with a crowd group and a "
        f"look-alike, on the scenes), with the detector of *{run.method}* (seed {run.seed}). "
        "Where the picked negatives lie: the first column is the share of random's negatives "
        "covering each pixel, the others the difference to it (red: the sampler puts more of "
        "its negatives there, blue: fewer); ground truths white, look-alikes dashed cyan.",
        "",
        f"![where each sampler's negatives lie]({sheet})",
        "",
        f"The picked negatives that overlap a positive much (IoU(p,n) ≥ {MIN_IOU_PN}, the upper "
        "of the Overlap Sampler's two bins), coloured by IoU(p,n), the quantity it draws by:",
        "",
        f"![negatives overlapping a positive]({overlaps})",
        "",
        "The picked negatives' IoU with the ground truth and with the positives (IoU(p,n)), over "
        f"more training images ([counts as CSV]({csv})):",
        "",
        f"![IoU histograms]({hist})",
        "",
    ]
