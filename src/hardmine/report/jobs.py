"""Trainings side by side: ``hardmine compare --jobs N`` on a CPU, ``--devices 0,1,...`` on GPUs.

A comparison is many independent runs (methods x seeds), each in its own run directory, so they
can train at the same time. Each training here runs in a process of its own, started with
multiprocessing's ``spawn`` method (a fresh interpreter: no state, lock or CUDA context inherited
from the parent), at most one per *slot*:

- on a CPU, ``N`` slots share the cores: each process runs torch on ``max(1, cpus // N)`` threads
  (``cpus``: the cores this process may use), so ``N`` runs do not oversubscribe the machine;
- on GPUs, one slot per entry of ``devices``: the process sees only that device
  (``CUDA_VISIBLE_DEVICES``, set before CUDA starts in it). A device named twice takes two runs
  at a time.

A process trains exactly what ``train(config, resume=True)`` trains in the parent, with the same
configuration and seed. The run directory, its checkpoints and ``results.json`` are the same bit
for bit where the parent runs torch on as many threads as the slot: on the CPU, torch's sums over
another number of threads add in another order, which moves the losses from about the 6th digit,
and a run's AP sooner (``--jobs 2`` on 2 cores equals ``--jobs 1`` under ``OMP_NUM_THREADS=1``,
the comparison that ``tests/report/test_jobs.py`` makes). A process reports back the failure as
the parent would record it: the exception's first line and its traceback. Its output goes to
``train.log`` in its run directory rather than to the terminal, where several would interleave.
A process whose parent dies (a killed comparison) stops itself, so that a rerun never finds a run
still being trained by an orphan; on Ctrl-C the parent stops its processes before it exits.

The processes are not daemonic: a daemonic process may not start processes of its own, and a
training with ``data.num_workers >= 1`` starts its ``DataLoader`` workers. What ``daemon`` would
give is done here instead: the parent stops (SIGTERM, then SIGKILL after ``STOP_SECONDS``) and
joins every process it started when it stops early (Ctrl-C, an exception, a caller that closes the
generator), and a process stops itself when its parent is gone (``_exit_with_parent``). A process
stops on SIGTERM by raising ``SystemExit``, so that it ends like a finished one: its ``DataLoader``
workers stopped, its semaphores (``tqdm``'s lock) unlinked, none left for the resource tracker
to warn about.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
LOG_NAME = "train.log"
#: How long a process has to stop after SIGTERM before it is killed.
STOP_SECONDS = 30.0


@dataclass(frozen=True)
class Slot:
    """Where one training process runs.

    Attributes:
        threads: torch's intra-op threads in the process.
        device: ``CUDA_VISIBLE_DEVICES`` for the process (a GPU's index), or None to leave it.
    """

    threads: int
    device: str | None = None


def available_cpus() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def make_slots(
    jobs: int | None = None, devices: Sequence[str] | None = None, *, cpus: int | None = None
) -> list[Slot]:
    """The slots of ``--jobs`` / ``--devices`` (see the module docstring).

    Args:
        jobs: processes at a time; with ``devices``, it must be their number (or None).
        devices: GPU indices, one slot each.
        cpus: the cores to divide; ``available_cpus()`` by default.

    Raises:
        ValueError: ``jobs < 1``, no devices, or ``jobs`` other than the number of devices.
    """
    cpus = available_cpus() if cpus is None else cpus
    if devices is not None:
        devices = [d.strip() for d in devices]
        if not devices or not all(devices):
            raise ValueError("--devices: expected GPU indices such as 0,1")
        if jobs is not None and jobs != len(devices):
            raise ValueError(
                f"--jobs {jobs} with --devices {','.join(devices)}: one run per device entry, "
                f"so --jobs must be {len(devices)} (or left out)"
            )
        threads = max(1, cpus // len(devices))  # the CPU side of each GPU run (data, NMS)
        return [Slot(threads=threads, device=d) for d in devices]
    jobs = 1 if jobs is None else jobs
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    return [Slot(threads=max(1, cpus // jobs)) for _ in range(jobs)]


@dataclass(frozen=True)
class JobResult:
    """How one training process ended.

    Attributes:
        key: the task's key.
        error: ``"Type: message"`` (first line) of its failure; None when it finished.
        traceback: the failure's traceback text (or what is known of a process that died).
    """

    key: Hashable
    error: str | None = None
    traceback: str | None = None


Task = tuple[Hashable, Callable[..., Any], tuple[Any, ...], Path]


def run_jobs(tasks: Sequence[Task], slots: Sequence[Slot]) -> Iterator[JobResult]:
    """Run each task in a process of its own, at most one per slot; yield results as they end.

    Args:
        tasks: ``(key, function, args, run_dir)``: the process calls ``function(*args)``
            (picklable, importable at module level) and writes its output to
            ``run_dir / LOG_NAME``.
        slots: where the processes run.

    Yields:
        One ``JobResult`` per task, in the order they end.
    """
    context = multiprocessing.get_context("spawn")
    pending = list(tasks)
    free = list(slots)
    running: dict[Any, tuple[Any, Connection, Hashable, Slot]] = {}
    try:
        while pending or running:
            while pending and free:
                key, function, args, run_dir = pending.pop(0)
                slot = free.pop(0)
                receive, send = context.Pipe(duplex=False)
                process = context.Process(
                    target=_child,
                    args=(function, args, slot, send, os.getpid(), Path(run_dir) / LOG_NAME),
                    name=f"hardmine-{run_dir}",
                    daemon=False,  # its DataLoader workers are processes (module docstring)
                )
                process.start()
                send.close()  # the child holds the only writing end: EOF when it dies
                running[process.sentinel] = (process, receive, key, slot)
            for sentinel in wait(list(running)):
                process, receive, key, slot = running.pop(sentinel)
                process.join()
                message = None
                with contextlib.suppress(EOFError, OSError):
                    if receive.poll():
                        message = receive.recv()
                receive.close()
                status = process.exitcode
                process.close()
                free.append(slot)
                if message is None:
                    error = f"ChildProcessError: the training process died ({ended(status)})"
                    yield JobResult(key, error, f"{error}\nIts output is in {LOG_NAME}.\n")
                else:
                    yield JobResult(key, *message)
    finally:
        _stop([(process, receive) for process, receive, _, _ in running.values()])


def _stop(children: Sequence[tuple[Any, Connection]]) -> None:
    """Stop and join ``children`` (Ctrl-C, or the caller stopped early): SIGTERM, and SIGKILL for
    one still running after ``STOP_SECONDS``; then close their pipes and process handles."""
    for process, _ in children:
        with contextlib.suppress(OSError, ValueError):
            process.terminate()
    deadline = time.monotonic() + STOP_SECONDS
    for process, receive in children:
        with contextlib.suppress(OSError, ValueError):
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                process.kill()
                process.join()
            process.close()
        receive.close()


def ended(status: int | None) -> str:
    """How a process with exit status ``status`` ended (``Process.exitcode``: ``-N`` for a
    signal N), in words: ``exit status 3``, ``killed by signal 9 (SIGKILL)``."""
    if status is not None and status < 0:
        try:
            name = f" ({signal.Signals(-status).name})"
        except ValueError:
            name = ""
        return f"killed by signal {-status}{name}"
    return f"exit status {status}"


def _child(
    function: Callable[..., Any],
    args: tuple[Any, ...],
    slot: Slot,
    send: Connection,
    parent: int,
    log_path: Path,
) -> None:
    """A training process: its device and threads, a watch on the parent, then ``function``."""
    if slot.device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = slot.device  # before CUDA starts in this process
    os.environ["OMP_NUM_THREADS"] = str(slot.threads)
    # The parent's SIGTERM (and _exit_with_parent's) ends the training as an exception would:
    # the DataLoader workers stop and the semaphores are unlinked on the way out.
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    signal.signal(signal.SIGINT, _stop_on_sigint)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", buffering=1) as out:
        # The file descriptors too, so that C++ warnings and tqdm land in the log as well.
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        sys.stdout = sys.stderr = out
        logging.basicConfig(format="%(message)s", stream=out, force=True)
        logging.getLogger("hardmine").setLevel(logging.INFO)
        import torch

        torch.set_num_threads(slot.threads)
        try:
            function(*args)
        except BaseException as error:  # reported like the parent records a failure in-process
            text = traceback.format_exc()
            out.write(text)
            message = (f"{type(error).__name__}: {error}".splitlines()[0], text)
        else:
            message = (None, None)
        # Ended: the parent's SIGTERM must not cut the way out short (_stop_on_sigint).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with contextlib.suppress(OSError):  # a parent that stopped reading is gone or stopping
            send.send(message)
        send.close()


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM in a training process: end it by ``SystemExit`` (``128 + 15``, the shells'
    status for SIGTERM), so that it is cleaned up like a process that returns."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills at once
    raise SystemExit(128 + signum)


def _stop_on_sigint(signum: int, frame: Any) -> None:
    """Ctrl-C in a training process (the terminal signals the whole process group): end it by
    ``KeyboardInterrupt``, as Python would, and ignore the SIGTERM that the parent, stopped by the
    same Ctrl-C, sends next. Raised in the middle of the way out, that ``SystemExit`` could fall
    between a semaphore's unlink and its unregistering (``multiprocessing``'s ``SemLock``
    finaliser), and the resource tracker then warned of a leaked semaphore that was gone. The
    parent's SIGKILL after ``STOP_SECONDS`` still ends a process that does not stop."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _exit_with_parent(parent: int) -> None:
    """End this process when its parent is gone (its parent id changes to the reaper's): by
    SIGTERM (``_stop_on_sigterm``), and at once if that has not ended it in ``STOP_SECONDS``."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(STOP_SECONDS)
    os._exit(1)
