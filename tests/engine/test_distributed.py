"""DDP under torchrun: two CPU processes (gloo) end a few steps with identical weights."""

import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from hardmine.engine.distributed import rank_seed

# Each process trains the same tiny run and saves its own copy of the weights.
WORKER = textwrap.dedent(
    """
    import os, sys
    import torch
    from hardmine.config import load_config
    from hardmine.engine.train import train

    out = sys.argv[1]
    config = load_config(None, {
        "model": {"name": "faster_rcnn_tiny", "min_size": 64, "max_size": 64},
        "sampler": {"name": "random", "num": 32},
        "data.num_train": 4, "data.image_size": 64, "data.batch_size": 1,
        "train.epochs": 1, "train.warmup_steps": 1, "train.log_every": 1,
        "train.eval_every": 0, "device": "cpu", "output_dir": out + "/run",
    })
    result = train(config)
    torch.save(result.model.state_dict(), f"{out}/rank{os.environ['RANK']}.pt")
    """
)


def test_two_processes_end_with_identical_weights(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    done = subprocess.run(
        [*command, str(script), str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # Four images over two processes, one per step: two steps, logged by rank 0 alone.
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2


def test_rank_seeds_differ() -> None:
    seeds = {rank_seed(seed, rank) for seed in range(4) for rank in range(4)}
    assert len(seeds) == 16
    assert all(0 <= s < 2**63 for s in seeds)
