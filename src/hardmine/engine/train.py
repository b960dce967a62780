"""The training loop: ``train_one_epoch`` and ``train`` (one detector, one sampler or assigner).

What a run is made of comes from ``hardmine.engine.build``; what it writes, and where, from
``hardmine.engine.rundir``.

Reproducibility: the weights are initialised from ``seed``; the data order comes from
``DistributedSampler(seed=seed)`` and the epoch; each process's sampler generator (and global RNG)
from ``(seed, rank)``. A checkpoint stores all of them with the position inside the epoch (and the
half-filled log window), so a resumed run takes exactly the steps the uninterrupted run would have
taken, at any step. That holds because nothing but the training steps draws from those states:
each epoch's ``DataLoader`` draws its workers' base seed from a generator of its own, seeded from
``(seed, rank, epoch)``, not from torch's global RNG (which torchvision's RPN sampler draws its
anchors from); evaluation runs with the random states saved and put back. ``--resume`` refuses a
configuration that differs from the checkpoint's in anything but ``hardmine.config.MAY_DIFFER``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from hardmine._atomic import check_writable
from hardmine.config import (
    MAY_DIFFER,
    RunConfig,
    config_from_dict,
    config_to_dict,
    describe_differences,
    differences,
    save_config,
    with_absolute_paths,
)
from hardmine.data import collate_fn
from hardmine.engine import checkpoint
from hardmine.engine.build import (
    RUN_REGISTRIES,
    PickCounter,
    build_datasets,
    build_detector,
    check_model,
    training_set,
)
from hardmine.engine.distributed import (
    Process,
    barrier,
    mean_over_processes,
    process_group,
    rank_seed,
    unwrap,
    wrap,
)
from hardmine.engine.evaluate import evaluate, iou_types_of
from hardmine.engine.roi_loss import mean_loss_all_rois
from hardmine.engine.rundir import (
    CONFIG_NAME,
    DETECTIONS_NAME,
    LOSS_PLOT,
    METRICS_NAME,
    RESULTS_NAME,
    MetricsLog,
    plot_run,
    write_detections,
    write_json,
)
from hardmine.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    HardmineError,
    NonFiniteError,
    RunError,
    RunExistsError,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What ``train`` returns.

    Attributes:
        model: the trained detector (without a DDP wrapper), in train mode.
        metrics: the final COCO metrics (AP, AP50, ...); empty when evaluation is off.
        run_dir: the run directory.
    """

    model: nn.Module
    metrics: dict[str, float | None]
    run_dir: Path
    finished_before: bool = False


class NonFiniteLossError(HardmineError, RuntimeError):
    """A loss (or its gradient) became NaN or infinite; the run stopped before the optimiser step.

    The command line reports it as one line, with exit status 1: the input was valid, the run
    diverged.
    """

    exit_status = 1


@dataclass
class Position:
    """Where a run stands; saved in every checkpoint.

    Attributes:
        epoch: the current epoch, 0-based.
        epoch_step: steps done in ``epoch``.
        step: steps done in total.
    """

    epoch: int = 0
    epoch_step: int = 0
    step: int = 0


def lr_factor(step: int, config: RunConfig, total_steps: int) -> float:
    """The learning rate at ``step`` as a fraction of ``train.lr``: linear warm-up, step decay."""
    train = config.train
    warmup = 1.0
    if step < train.warmup_steps:
        warmup = train.warmup_factor + (1 - train.warmup_factor) * step / train.warmup_steps
    # The nearest step: 8/12 of 1200 steps is 799.99... in floating point, and epoch 8 ends at 800.
    decays = sum(step >= round(fraction * total_steps) for fraction in train.decay_at)
    return warmup * train.gamma**decays


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def num_workers(config: RunConfig) -> int:
    """``data.num_workers`` capped by the CPUs available: more loading processes than CPUs only
    compete with training (PyTorch warns about it). It changes no result: the data are the same
    and no worker draws from the training's random state."""
    return min(config.data.num_workers, available_cpus())


def epoch_loader(
    dataset: Dataset, config: RunConfig, process: Process, *, epoch: int, skip: int
) -> DataLoader:
    """The batches of ``epoch`` for this process, leaving out the first ``skip`` (done before a
    resume).

    The order is ``DistributedSampler``'s (a permutation from ``seed + epoch``, split by rank), so
    it is the same whether or not the run was interrupted. The loader's own generator, seeded from
    ``(seed, rank, epoch)``, gives its workers' base seed: without it, making the iterator would
    draw that seed from torch's global random state, which a resumed run restores just before.
    """
    # A training set that changes with the epoch (the folder images of a NegativeImageMix) is
    # told which epoch it serves before the loader, and its workers, copy it.
    set_epoch = getattr(dataset, "set_epoch", None)
    if set_epoch is not None:
        set_epoch(epoch)
    order = DistributedSampler(
        dataset, num_replicas=process.world_size, rank=process.rank, seed=config.seed
    )
    order.set_epoch(epoch)
    indices = list(order)[skip * config.data.batch_size :]
    return DataLoader(
        dataset,
        batch_size=config.data.batch_size,
        sampler=indices,
        num_workers=num_workers(config),
        collate_fn=collate_fn,
        pin_memory=process.device.type == "cuda",
        persistent_workers=False,
        generator=torch.Generator().manual_seed(rank_seed(config.seed, process.rank, epoch)),
    )


@dataclass
class Session:
    """Everything a training run holds while it runs.

    Attributes:
        config: the run configuration.
        process: this process's rank, world size and device.
        model: the detector, in DDP when distributed.
        optimizer: SGD.
        scheduler: warm-up and step decay, stepped every step.
        scaler: the AMP gradient scaler (disabled without AMP).
        generator: the samplers' generator.
        counter: the picks seen by the loss since the last log row.
        run_dir: the run directory.
        log: the metrics log (main process only).
        steps_per_epoch: steps per epoch in each process.
        categories: the category names of the data (stored in the checkpoint: a run read back on
            other data is refused by them).
        position: where the run stands.
        window: per logged key, the sum over the steps since the last log row.
        window_steps: the steps since the last log row.
        checkpoint_step: the step of the checkpoint in ``run_dir``; None while there is none.
        digests: the SHA-256 of each input file whose path is a setting (``input_digests``),
            taken when the run started: a resume refuses a file whose content changed since.
    """

    config: RunConfig
    process: Process
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    counter: PickCounter
    run_dir: Path
    log: MetricsLog | None
    steps_per_epoch: int
    categories: list[str] = field(default_factory=list)
    position: Position = field(default_factory=Position)
    window: dict[str, float] = field(default_factory=dict)
    window_steps: int = 0
    checkpoint_step: int | None = None
    digests: dict[str, str] = field(default_factory=dict)

    @property
    def amp(self) -> bool:
        return self.scaler.is_enabled()

    @property
    def last_step(self) -> int:
        """The step the run ends at."""
        total = self.config.train.epochs * self.steps_per_epoch
        max_steps = self.config.train.max_steps
        return total if max_steps is None else min(total, max_steps)

    @property
    def finished(self) -> bool:
        """Whether the run has taken its last step and written its results."""
        return self.position.step >= self.last_step and (self.run_dir / RESULTS_NAME).exists()

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint holds: weights, optimiser, schedule, RNG states, position, the log
        window since the last row, the configuration and the categories."""
        state = {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "generator": self.generator.get_state(),
            "rng": torch.get_rng_state(),
            "position": asdict(self.position),
            "window": {
                "sums": dict(self.window),
                "steps": self.window_steps,
                "picks": self.counter.state_dict(),
            },
            "config": config_to_dict(with_absolute_paths(self.config)),
            "categories": list(self.categories),
            "digests": dict(self.digests),
        }
        if self.process.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.process.device)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a checkpoint written by ``state_dict``."""
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and self.process.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.process.device)
        self.position = Position(**state["position"])
        window = state.get("window")  # absent in checkpoints of older versions
        if window is not None:
            self.window, self.window_steps = dict(window["sums"]), int(window["steps"])
            self.counter.load_state_dict(window["picks"], self.process.device)
        self.checkpoint_step = self.position.step

    def save_checkpoint(self) -> None:
        """Write the checkpoint (main process; every process holds the same weights)."""
        if self.process.is_main:
            checkpoint.save_atomic(self.state_dict(), self.run_dir / checkpoint.CHECKPOINT_NAME)
        self.checkpoint_step = self.position.step

    def diverged(self, what: str) -> NonFiniteLossError:
        """The error that stops the run at this step: ``what`` went non-finite."""
        pos = self.position
        if self.checkpoint_step is None:
            kept = "no checkpoint was written"
        else:
            kept = f"the last checkpoint (step {self.checkpoint_step}) is in {self.run_dir}"
        return NonFiniteLossError(
            f"non-finite loss at step {pos.step + 1} (epoch {pos.epoch + 1}): {what}. Stopped "
            f"before the optimiser step; {kept}. Lower train.lr or raise train.warmup_steps, "
            "and train in a new output_dir"
        )


def _to_device(targets: Sequence[Mapping[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    return [
        {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in t.items()}
        for t in targets
    ]


# The window's count of steps with a finite gradient norm, kept beside its sums.
_NORMED = "grad_norm_steps"


def _parameters(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The optimiser's parameters that have a gradient."""
    return [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def _gradient_norm(optimizer: torch.optim.Optimizer) -> Tensor:
    """The 2-norm of every gradient together: finite exactly when every gradient is."""
    grads = [p.grad for p in _parameters(optimizer)]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads)


def train_one_epoch(session: Session, loader: DataLoader) -> None:
    """Train on ``loader``'s batches from ``session.position`` to the end of the epoch (or the
    run's last step), logging and checkpointing on the way.

    Raises:
        NonFiniteLossError: a loss or its gradient became NaN or infinite (or the forward pass met
            non-finite values: a diverged model's boxes or losses); the optimiser step was not
            taken, and the last checkpoint (from before) is kept.
    """
    config, process, pos = session.config, session.process, session.position
    model, device = session.model, process.device
    model.train()
    bar = tqdm(
        total=session.steps_per_epoch,
        initial=pos.epoch_step,
        desc=f"epoch {pos.epoch + 1}/{config.train.epochs}",
        disable=not (process.is_main and sys.stderr.isatty()),
        dynamic_ncols=True,
    )
    # Without a terminal (train > log 2>&1), a progress line per log row instead of the bar.
    lines = process.is_main and bar.disable
    since, since_step = time.monotonic(), pos.step
    for images, targets in loader:
        if pos.step >= session.last_step:
            break
        images = [image.to(device, non_blocking=True) for image in images]
        try:
            with torch.autocast(device.type, enabled=session.amp):
                losses: dict[str, Tensor] = model(images, _to_device(targets, device))
        except NonFiniteError as error:  # a sampler or assigner met the diverged model's values
            raise session.diverged(f"the forward pass met non-finite values ({error})") from None
        loss = torch.stack(list(losses.values())).sum()
        session.optimizer.zero_grad(set_to_none=True)
        session.scaler.scale(loss).backward()
        clip = config.train.grad_clip
        if session.amp and clip is not None:
            session.scaler.unscale_(session.optimizer)  # clip the true gradients
        # Under AMP the scaler skips steps with non-finite gradients itself.
        measured = not session.amp or clip is not None
        grad_norm = _gradient_norm(session.optimizer) if measured else loss.new_zeros(())
        # One host synchronisation per step: the process-mean losses, for the check and the bar.
        stacked = torch.stack([loss, *losses.values(), grad_norm.to(loss)]).detach().float()
        total, *parts, norm = mean_over_processes(stacked).tolist()
        if not math.isfinite(total):
            named = ", ".join(f"{k}={v:.4g}" for k, v in zip(losses, parts, strict=True))
            raise session.diverged(named)
        if not session.amp and not math.isfinite(norm):
            raise session.diverged(f"loss={total:.4g}, but its gradient is not finite")
        if clip is not None and math.isfinite(norm):
            torch.nn.utils.clip_grads_with_norm_(_parameters(session.optimizer), clip, grad_norm)
        lr = session.optimizer.param_groups[0]["lr"]  # this step's, before the schedule moves on
        session.scaler.step(session.optimizer)
        session.scaler.update()
        session.scheduler.step()
        pos.step += 1
        pos.epoch_step += 1
        window = session.window
        for key, value in zip(["loss", *losses, "lr"], [total, *parts, lr], strict=True):
            window[key] = window.get(key, 0.0) + value
        if measured and math.isfinite(norm):  # under AMP a non-finite step is skipped, not logged
            window["grad_norm"] = window.get("grad_norm", 0.0) + norm
            window[_NORMED] = window.get(_NORMED, 0) + 1
        session.window_steps += 1
        bar.update()
        bar.set_postfix(loss=f"{total:.3f}")

        if pos.step % config.train.log_every == 0 or pos.step == session.last_step:
            picks = session.counter.take()
            mean = {k: v / session.window_steps for k, v in window.items() if k != _NORMED}
            if _NORMED in window:  # the mean over the steps whose norm was finite
                mean["grad_norm"] = window["grad_norm"] / window[_NORMED]
            if session.log is not None:
                row: dict[str, Any] = {"step": pos.step, "epoch": pos.epoch + 1} | mean
                if picks:
                    row["picks"] = picks
                session.log.write(row)
            if lines:
                now = time.monotonic()
                log.info(
                    "epoch %d/%d  step %d/%d  loss %.4f  lr %.3g  %.2f s/step",
                    pos.epoch + 1,
                    config.train.epochs,
                    pos.step,
                    session.last_step,
                    mean["loss"],
                    lr,
                    (now - since) / max(pos.step - since_step, 1),
                )
                since, since_step = now, pos.step
            session.window, session.window_steps = {}, 0
        every = config.train.checkpoint_every
        if every and pos.step % every == 0:
            session.save_checkpoint()
    bar.close()


@contextlib.contextmanager
def _random_state_kept(session: Session) -> Iterator[None]:
    """Put torch's global random state (CPU and this process's GPU) and the samplers' generator
    back as they were after the block: evaluating must not move the training's random draws, or a
    run resumed after an evaluation would differ from the uninterrupted one."""
    devices = [session.process.device] if session.process.device.type == "cuda" else []
    generator = session.generator.get_state()
    with torch.random.fork_rng(devices=devices):
        yield
    session.generator.set_state(generator)


def _evaluate(
    session: Session, val: Dataset, train_set: Dataset, *, final: bool = False
) -> dict[str, float | None]:
    """COCO AP on ``val`` in the main process (the others wait), logged.

    The log row also gets ``roi_loss`` (``_roi_loss``). It stays out of the returned metrics,
    which are the AP table's. The ``final`` evaluation's detections are kept in the run
    directory (``detections.json``) for an error breakdown. The random states are left as they
    were.
    """
    metrics: dict[str, float | None] = {}
    if session.process.is_main:
        with _random_state_kept(session):
            metrics = _evaluate_main(session, val, train_set, final=final)
    barrier()
    return metrics


def _roi_loss(session: Session, train_set: Dataset) -> float | None:
    """The OHEM paper's sampler-independent measure: the mean loss over all RoIs of the first
    ``train.roi_loss_images`` images of the training set; None for detectors without RoI heads,
    or with ``roi_loss_images`` 0."""
    images = session.config.train.roi_loss_images
    if images <= 0:
        return None
    model, device = unwrap(session.model), session.process.device
    return mean_loss_all_rois(model, train_set, device=device, max_images=images)


def _evaluate_main(
    session: Session, val: Dataset, train_set: Dataset, *, final: bool
) -> dict[str, float | None]:
    model, device = unwrap(session.model), session.process.device
    detections: list[dict[str, Any]] = []
    iou_types = iou_types_of(session.config)
    metrics = evaluate(model, val, device=device, iou_types=iou_types, detections_out=detections)
    if final:
        write_detections(session.run_dir / DETECTIONS_NAME, detections)
    if session.log is not None:
        pos = session.position
        row: dict[str, Any] = {"step": pos.step, "epoch": pos.epoch + 1, "eval": metrics}
        roi_loss = _roi_loss(session, train_set)
        if roi_loss is not None:
            row["roi_loss"] = roi_loss
        session.log.write(row)
    return metrics


def _log_roi_loss(session: Session, train_set: Dataset) -> None:
    """A log row with ``roi_loss`` alone, at the end of an epoch without an evaluation, so that
    the measure has a point per epoch (main process; the others wait; random states kept)."""
    if session.process.is_main and session.log is not None:
        with _random_state_kept(session):
            roi_loss = _roi_loss(session, train_set)
        if roi_loss is not None:
            pos = session.position
            session.log.write({"step": pos.step, "epoch": pos.epoch + 1, "roi_loss": roi_loss})
    barrier()


#: The files ``train`` writes atomically in a run directory (a killed write leaves a temporary).
_WRITTEN = (checkpoint.CHECKPOINT_NAME, CONFIG_NAME, METRICS_NAME, RESULTS_NAME, DETECTIONS_NAME)


def input_digests(config: RunConfig) -> dict[str, str]:
    """The SHA-256 of the input files ``config`` names by a setting whose content the run's
    steps depend on (the hard negatives), by setting; a file that is not there is left out (the
    data loading names it)."""
    digests = {}
    if config.hard_negatives is not None and Path(config.hard_negatives).is_file():
        with open(config.hard_negatives, "rb") as f:
            digests["hard_negatives"] = hashlib.file_digest(f, "sha256").hexdigest()
    return digests


def check_resumable(
    state: Mapping[str, Any],
    config: RunConfig,
    path: Path,
    digests: Mapping[str, str] | None = None,
) -> None:
    """Raise unless the checkpoint ``state`` (read from ``path``) can continue with ``config``.

    Args:
        state: the checkpoint.
        config: the configuration to continue with.
        path: the checkpoint's file.
        digests: ``input_digests(config)`` now; a file whose digest differs from the one the
            checkpoint recorded when the run started is refused (checkpoints without digests,
            of older versions, are not checked).

    Raises:
        CheckpointError: the file is not a checkpoint of ``hardmine train``.
        RunError: ``config`` differs from the checkpoint's configuration in a setting that
            changes the result (anything outside ``MAY_DIFFER``), or an input file changed since
            the run started; the message names them.
    """
    missing = [k for k in checkpoint.REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a checkpoint of hardmine train (no {missing})")
    try:
        saved = config_from_dict(state["config"], registries=RUN_REGISTRIES)
    except ConfigError as error:
        raise CheckpointError(
            f"{path}: its configuration is not one this hardmine reads ({error})"
        ) from None
    changes = differences(saved, config, ignore=(*MAY_DIFFER, "device"))
    if _device_type(saved.device) != _device_type(config.device):
        changes.append(("device", saved.device, config.device))
    if changes:
        run_dir, changed = path.parent, describe_differences(changes)
        raise RunError(
            f"{run_dir}: --resume with settings other than the run's ({changed}); "
            f"resume it as it was (--config {run_dir / CONFIG_NAME} --resume), or train the new "
            "settings in another output_dir"
        )
    saved_digests = state.get("digests") or {}
    for key, digest in saved_digests.items():
        if digests is not None and digests.get(key) != digest:
            file = getattr(config, key)
            raise RunError(
                f"{path.parent}: --resume, but {key} {file} changed since the run started (its "
                "SHA-256 differs); resume with the file as it was, or train with the new one in "
                "another output_dir"
            )


def _device_type(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name).type


def _data_name(config: RunConfig, split: str) -> str:
    data = config.data
    if data.kind == "scenes":
        return f"the built-in scenes' {split} split"
    if data.root is not None:
        return str(data.root)
    return str(data.train_ann if split == "train" else data.val_ann)


def train(config: RunConfig, *, resume: bool = False) -> TrainResult:
    """Train the detector of ``config`` in ``config.output_dir``; under ``torchrun``, with DDP.

    Args:
        config: the run configuration.
        resume: continue from the run directory's checkpoint (start afresh if there is none).
            A run that finished is not trained or evaluated again: its results are returned.

    Returns:
        The trained detector, the final COCO metrics and the run directory.

    Raises:
        RunExistsError: the run directory holds a checkpoint and ``resume`` is False.
        RunError: ``resume`` with a configuration that differs from the checkpoint's in a
            setting that changes the result (``check_resumable``).
        CheckpointError: the checkpoint to resume from is unreadable.
        DataError: the training set is empty, or the validation set while evaluation is on.
        NonFiniteLossError: a loss became NaN or infinite.
    """
    run_dir = Path(config.output_dir)
    ckpt_path = run_dir / checkpoint.CHECKPOINT_NAME
    if ckpt_path.exists() and not resume:
        raise RunExistsError(
            f"{run_dir} already holds a checkpoint: pass --resume to continue that run, or choose "
            "another output_dir"
        )
    check_model(config)
    check_writable(run_dir, f"output_dir {run_dir}")
    state = None
    digests = input_digests(config)  # before any work: what this run's steps read
    if resume and ckpt_path.exists():
        state = checkpoint.load(ckpt_path)
        check_resumable(state, config, ckpt_path, digests)
    elif resume:  # said, so that a mistyped output_dir is not taken for a resumed run
        log.info("%s has no checkpoint to resume: the run starts at step 0", run_dir)
    with process_group(config.device) as process:
        start = time.monotonic()
        if process.is_main and run_dir.is_dir():
            checkpoint.remove_stale_temporaries(run_dir, _WRITTEN)
            checkpoint.remove_stale_temporaries(run_dir / LOSS_PLOT.parent, (LOSS_PLOT.name,))
        train_set, val_set, categories = build_datasets(config)
        train_set = training_set(config, train_set)
        if len(train_set) == 0:
            raise DataError(f"the training set ({_data_name(config, 'train')}) has no images")
        if config.train.eval_every and len(val_set) == 0:
            raise DataError(
                f"the validation set ({_data_name(config, 'val')}) has no images; set "
                "train.eval_every 0 to train without evaluation"
            )
        workers = num_workers(config)
        if workers < config.data.num_workers and process.is_main:
            log.info(
                "data.num_workers %d: %d, the CPUs available", config.data.num_workers, workers
            )
        counter = PickCounter()
        generator = torch.Generator(process.device).manual_seed(
            rank_seed(config.seed, process.rank)
        )
        torch.manual_seed(config.seed)  # the same initial weights in every process
        model = build_detector(config, len(categories), counter, generator=generator)
        model = model.to(process.device)
        torch.manual_seed(rank_seed(config.seed, process.rank))  # any other randomness, per rank
        params = [p for p in model.parameters() if p.requires_grad]
        train_cfg = config.train
        optimizer = torch.optim.SGD(
            params,
            lr=train_cfg.lr,
            momentum=train_cfg.momentum,
            weight_decay=train_cfg.weight_decay,
        )
        batches = math.ceil(len(train_set) / process.world_size)
        steps_per_epoch = math.ceil(batches / config.data.batch_size)
        total_steps = train_cfg.epochs * steps_per_epoch
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, config, total_steps)
        )
        amp = process.device.type == "cuda" if train_cfg.amp is None else train_cfg.amp
        scaler = torch.amp.GradScaler(process.device.type, enabled=amp)
        session = Session(
            config=config,
            process=process,
            model=wrap(model, process),
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            generator=generator,
            counter=counter,
            run_dir=run_dir,
            log=None,
            steps_per_epoch=steps_per_epoch,
            categories=list(categories),
            digests=digests,
        )
        if state is not None:
            # On the CPU: RNG states must stay there; weights and optimiser state are copied to
            # the device by load_state_dict.
            session.load_state_dict(state)
            if session.finished:  # nothing to train or evaluate: read what it wrote
                results = json.loads((run_dir / RESULTS_NAME).read_text())
                log.info("%s finished before, at step %d", run_dir, session.position.step)
                return TrainResult(model, results.get("metrics", {}), run_dir, finished_before=True)
        if process.is_main:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                reason = error.strerror
                raise RunError(f"output_dir {run_dir}: cannot create it ({reason})") from None
            save_config(with_absolute_paths(config), run_dir / CONFIG_NAME)
            session.log = MetricsLog(
                run_dir, resume_step=session.position.step if state is not None else None
            )
        try:
            metrics = _train_epochs(session, train_set, val_set, resumed=state is not None)
        finally:
            if session.log is not None:
                session.log.close()
        if process.is_main:
            results = {
                "metrics": metrics,
                "steps": session.position.step,
                "seconds": time.monotonic() - start,
            }
            write_json(run_dir / RESULTS_NAME, results)
            plot_run(run_dir)
        return TrainResult(model=model, metrics=metrics, run_dir=run_dir)


def _at_epoch_end(session: Session) -> bool:
    """Whether the run stands at the end of an epoch, before its last step."""
    pos = session.position
    return pos.epoch_step >= session.steps_per_epoch and pos.step < session.last_step


def _eval_due(session: Session) -> bool:
    """Whether the run stands at the end of an epoch that evaluates, before its last step."""
    every = session.config.train.eval_every
    return bool(every and _at_epoch_end(session) and (session.position.epoch + 1) % every == 0)


def _end_epoch(session: Session, train_set: Dataset, val_set: Dataset) -> None:
    """At an epoch's end: evaluate when due, else log the mean loss over all RoIs (neither
    without evaluations, ``eval_every`` 0)."""
    if _eval_due(session):
        _evaluate(session, val_set, train_set)
    elif session.config.train.eval_every and _at_epoch_end(session):
        _log_roi_loss(session, train_set)


def _train_epochs(
    session: Session, train_set: Dataset, val_set: Dataset, *, resumed: bool
) -> dict[str, float | None]:
    """The epoch loop of ``train``: train, checkpoint and evaluate until the last step; the mean
    loss over all RoIs is logged at every epoch's end.

    A resumed run first ends its epoch if its checkpoint is at one: the killed run may have died
    during that evaluation (``MetricsLog`` dropped any row of it).
    """
    config, pos = session.config, session.position
    if resumed:
        _end_epoch(session, train_set, val_set)
    while pos.step < session.last_step:
        if pos.epoch_step >= session.steps_per_epoch:
            pos.epoch, pos.epoch_step = pos.epoch + 1, 0
        loader = epoch_loader(
            train_set, config, session.process, epoch=pos.epoch, skip=pos.epoch_step
        )
        train_one_epoch(session, loader)
        session.save_checkpoint()
        _end_epoch(session, train_set, val_set)
    return _evaluate(session, val_set, train_set, final=True) if config.train.eval_every else {}
