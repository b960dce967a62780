"""The training loop: ``train_one_epoch`` and ``train`` (one detector, one sampler or assigner).

What a run is made of comes from ``hardmine.engine.build``; what it writes, and where, from
``hardmine.engine.rundir``.

Reproducibility: the weights are initialised from ``seed``; the data order comes from
``DistributedSampler(seed=seed)`` and the epoch; each process's sampler generator (and global RNG)
from ``(seed, rank)``. A checkpoint stores all of them with the position inside the epoch, so a
resumed run takes exactly the steps the uninterrupted run would have taken.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from hardmine.config import RunConfig, config_to_dict, save_config
from hardmine.data import collate_fn
from hardmine.engine import checkpoint
from hardmine.engine.build import (
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
    RESULTS_NAME,
    MetricsLog,
    plot_run,
    write_detections,
    write_json,
)

#: Training images over whose RoIs the mean loss is logged at each evaluation (a few seconds on a
#: CPU for the tiny detectors).
ROI_LOSS_IMAGES = 32


@dataclass(frozen=True)
class TrainResult:
    """What ``train`` returns.

    Attributes:
        model: the trained detector (without a DDP wrapper), in train mode.
        metrics: the final COCO metrics (AP, AP50, ...); empty when evaluation is off.
        run_dir: the run directory.
    """

    model: nn.Module
    metrics: dict[str, float]
    run_dir: Path


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the run stopped before the optimiser step."""


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
    decays = sum(step >= int(fraction * total_steps) for fraction in train.decay_at)
    return warmup * train.gamma**decays


def epoch_loader(
    dataset: Dataset, config: RunConfig, process: Process, *, epoch: int, skip: int
) -> DataLoader:
    """The batches of ``epoch`` for this process, leaving out the first ``skip`` (done before a
    resume).

    The order is ``DistributedSampler``'s (a permutation from ``seed + epoch``, split by rank), so
    it is the same whether or not the run was interrupted.
    """
    order = DistributedSampler(
        dataset, num_replicas=process.world_size, rank=process.rank, seed=config.seed
    )
    order.set_epoch(epoch)
    indices = list(order)[skip * config.data.batch_size :]
    # Its own generator: a DataLoader iterator draws its workers' base seed when it starts, from
    # torch's global RNG otherwise, and a resumed run starts one more iterator than the
    # uninterrupted run; the global RNG feeds torchvision's RPN sampler, so a shared draw would
    # change the anchors it samples after a resume.
    seeds = torch.Generator().manual_seed(rank_seed(config.seed, process.rank) + epoch)
    return DataLoader(
        dataset,
        batch_size=config.data.batch_size,
        sampler=indices,
        num_workers=config.data.num_workers,
        collate_fn=collate_fn,
        pin_memory=process.device.type == "cuda",
        generator=seeds,
        persistent_workers=False,
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
        position: where the run stands.
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
    position: Position = field(default_factory=Position)

    @property
    def amp(self) -> bool:
        return self.scaler.is_enabled()

    @property
    def last_step(self) -> int:
        """The step the run ends at."""
        total = self.config.train.epochs * self.steps_per_epoch
        max_steps = self.config.train.max_steps
        return total if max_steps is None else min(total, max_steps)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint holds: weights, optimiser, schedule, RNG states and position."""
        state = {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "generator": self.generator.get_state(),
            "rng": torch.get_rng_state(),
            "position": asdict(self.position),
            "config": config_to_dict(self.config),
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

    def save_checkpoint(self) -> None:
        """Write the checkpoint (main process; every process holds the same weights)."""
        if self.process.is_main:
            checkpoint.save_atomic(self.state_dict(), self.run_dir / checkpoint.CHECKPOINT_NAME)


def _to_device(targets: Sequence[Mapping[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    return [
        {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in t.items()}
        for t in targets
    ]


def train_one_epoch(session: Session, loader: DataLoader) -> None:
    """Train on ``loader``'s batches from ``session.position`` to the end of the epoch (or the
    run's last step), logging and checkpointing on the way.

    Raises:
        NonFiniteLossError: a loss became NaN or infinite; the optimiser step was not taken, and the
            last checkpoint (from before) is kept.
    """
    config, process, pos = session.config, session.process, session.position
    model, device = session.model, process.device
    model.train()
    window: dict[str, float] = {}
    window_steps = 0
    bar = tqdm(
        total=session.steps_per_epoch,
        initial=pos.epoch_step,
        desc=f"epoch {pos.epoch + 1}/{config.train.epochs}",
        disable=not (process.is_main and sys.stderr.isatty()),
        dynamic_ncols=True,
    )
    for images, targets in loader:
        if pos.step >= session.last_step:
            break
        images = [image.to(device, non_blocking=True) for image in images]
        with torch.autocast(device.type, enabled=session.amp):
            losses: dict[str, Tensor] = model(images, _to_device(targets, device))
        loss = torch.stack(list(losses.values())).sum()
        session.optimizer.zero_grad(set_to_none=True)
        session.scaler.scale(loss).backward()
        # One host synchronisation per step: the process-mean losses, for the check and the bar.
        values = mean_over_processes(torch.stack([loss, *losses.values()]).detach().float())
        total, *parts = values.tolist()
        if not math.isfinite(total):
            named = ", ".join(f"{k}={v:.4g}" for k, v in zip(losses, parts, strict=True))
            raise NonFiniteLossError(
                f"non-finite loss at step {pos.step + 1} (epoch {pos.epoch + 1}): {named}. "
                f"Stopped before the optimiser step; the last good checkpoint is in "
                f"{session.run_dir} (lower train.lr or raise train.warmup_steps, then --resume)."
            )
        lr = session.optimizer.param_groups[0]["lr"]  # this step's, before the schedule moves on
        session.scaler.step(session.optimizer)
        session.scaler.update()
        session.scheduler.step()
        pos.step += 1
        pos.epoch_step += 1
        for key, value in zip(["loss", *losses, "lr"], [total, *parts, lr], strict=True):
            window[key] = window.get(key, 0.0) + value
        window_steps += 1
        bar.update()
        bar.set_postfix(loss=f"{total:.3f}")

        if pos.step % config.train.log_every == 0 or pos.step == session.last_step:
            picks = session.counter.take()
            if session.log is not None:
                row: dict[str, Any] = {"step": pos.step, "epoch": pos.epoch + 1}
                row |= {k: v / window_steps for k, v in window.items()}
                if picks:
                    row["picks"] = picks
                session.log.write(row)
            window, window_steps = {}, 0
        every = config.train.checkpoint_every
        if every and pos.step % every == 0:
            session.save_checkpoint()
    bar.close()


def _evaluate(
    session: Session, val: Dataset, train_set: Dataset, *, final: bool = False
) -> dict[str, float]:
    """COCO AP on ``val`` in the main process (the others wait), logged.

    The log row also gets ``roi_loss`` (``_roi_loss``). It stays out of the returned metrics,
    which are the AP table's. The ``final`` evaluation's detections are kept in the run
    directory (``detections.json``) for an error breakdown.
    """
    metrics: dict[str, float] = {}
    if session.process.is_main:
        model, device = unwrap(session.model), session.process.device
        detections: list[dict[str, Any]] = []
        metrics = evaluate(
            model,
            val,
            device=device,
            iou_types=iou_types_of(session.config),
            detections_out=detections,
        )
        if final:
            write_detections(session.run_dir / DETECTIONS_NAME, detections)
        if session.log is not None:
            pos = session.position
            row: dict[str, Any] = {"step": pos.step, "epoch": pos.epoch + 1, "eval": metrics}
            roi_loss = _roi_loss(session, train_set)
            if roi_loss is not None:
                row["roi_loss"] = roi_loss
            session.log.write(row)
    barrier()
    return metrics


def _roi_loss(session: Session, train_set: Dataset) -> float | None:
    """The OHEM paper's sampler-independent measure: the mean loss over all RoIs of (the first
    ``ROI_LOSS_IMAGES`` images of) the training set; None for detectors without RoI heads."""
    return mean_loss_all_rois(
        unwrap(session.model),
        train_set,
        device=session.process.device,
        max_images=ROI_LOSS_IMAGES,
    )


def _log_roi_loss(session: Session, train_set: Dataset) -> None:
    """A log row with ``roi_loss`` alone, at the end of an epoch without an evaluation, so that
    the measure has a point per epoch (main process; the others wait)."""
    if session.process.is_main and session.log is not None:
        roi_loss = _roi_loss(session, train_set)
        if roi_loss is not None:
            pos = session.position
            session.log.write({"step": pos.step, "epoch": pos.epoch + 1, "roi_loss": roi_loss})
    barrier()


def train(config: RunConfig, *, resume: bool = False) -> TrainResult:
    """Train the detector of ``config`` in ``config.output_dir``; under ``torchrun``, with DDP.

    Args:
        config: the run configuration.
        resume: continue from the run directory's checkpoint (start afresh if there is none).

    Returns:
        The trained detector, the final COCO metrics and the run directory.

    Raises:
        FileExistsError: the run directory holds a checkpoint and ``resume`` is False.
        NonFiniteLossError: a loss became NaN or infinite.
    """
    run_dir = Path(config.output_dir)
    ckpt_path = run_dir / checkpoint.CHECKPOINT_NAME
    if ckpt_path.exists() and not resume:
        raise FileExistsError(
            f"{run_dir} already holds a checkpoint: pass --resume to continue that run, or choose "
            "another output_dir"
        )
    check_model(config)
    with process_group(config.device) as process:
        start = time.monotonic()
        train_set, val_set, categories = build_datasets(config)
        train_set = training_set(config, train_set)
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
        )
        resumed = resume and ckpt_path.exists()
        if resumed:
            # On the CPU: RNG states must stay there; weights and optimiser state are copied to
            # the device by load_state_dict.
            session.load_state_dict(checkpoint.load(ckpt_path))
        if process.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, run_dir / CONFIG_NAME)
            session.log = MetricsLog(
                run_dir, resume_step=session.position.step if resumed else None
            )
        try:
            metrics = _train_epochs(session, train_set, val_set)
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


def _train_epochs(session: Session, train_set: Dataset, val_set: Dataset) -> dict[str, float]:
    """The epoch loop of ``train``: train, checkpoint and evaluate until the last step; the mean
    loss over all RoIs is logged at every epoch's end (neither without evaluations,
    ``eval_every`` 0)."""
    config, pos = session.config, session.position
    eval_every = config.train.eval_every
    while pos.step < session.last_step:
        if pos.epoch_step >= session.steps_per_epoch:
            pos.epoch, pos.epoch_step = pos.epoch + 1, 0
        loader = epoch_loader(
            train_set, config, session.process, epoch=pos.epoch, skip=pos.epoch_step
        )
        train_one_epoch(session, loader)
        session.save_checkpoint()
        if eval_every and pos.step < session.last_step:
            if (pos.epoch + 1) % eval_every == 0:
                _evaluate(session, val_set, train_set)
            else:
                _log_roi_loss(session, train_set)
    return _evaluate(session, val_set, train_set, final=True) if eval_every else {}
