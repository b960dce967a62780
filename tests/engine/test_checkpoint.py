"""Checkpoints: round trip, and atomic replacement (a failed write leaves the old file whole)."""

import os
from pathlib import Path

import pytest
import torch

from hardmine.engine import checkpoint


def test_round_trip(tmp_path: Path) -> None:
    state = {
        "model": {"w": torch.randn(3, 4), "b": torch.arange(3)},
        "rng": torch.get_rng_state(),
        "position": {"epoch": 1, "epoch_step": 2, "step": 7},
        "config": {"sampler": {"name": "ohem", "num": 128}, "train": {"decay_at": [0.5]}},
    }
    path = checkpoint.save_atomic(state, tmp_path / "sub" / "checkpoint.pt")
    loaded = checkpoint.load(path)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert torch.equal(loaded["model"]["b"], state["model"]["b"])
    assert torch.equal(loaded["rng"], state["rng"])
    assert loaded["position"] == state["position"] and loaded["config"] == state["config"]


def test_written_through_a_temporary_file_and_replace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    replaced: list[tuple[str, str]] = []
    real_replace = os.replace

    def spy(src: str, dst: str | Path) -> None:
        assert Path(src).exists() and Path(src).parent == tmp_path  # same file system
        replaced.append((str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    checkpoint.save_atomic({"x": torch.ones(2)}, tmp_path / "checkpoint.pt")
    assert len(replaced) == 1 and replaced[0][1] == str(tmp_path / "checkpoint.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_failed_write_keeps_the_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = checkpoint.save_atomic({"x": torch.zeros(2)}, tmp_path / "checkpoint.pt")

    def crash(obj: object, f: object) -> None:
        f.write(b"half a checkpoint")  # type: ignore[attr-defined]
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomic({"x": torch.ones(2)}, path)
    assert torch.equal(checkpoint.load(path)["x"], torch.zeros(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temp file left


def test_a_checkpoint_with_python_objects_is_refused_without_unsafe_advice(tmp_path: Path) -> None:
    """S12: the message repeated PyTorch's advice to load with weights_only=False, which runs the
    file's code."""
    import argparse

    from hardmine.errors import CheckpointError

    path = tmp_path / "checkpoint.pt"
    torch.save({"x": argparse.Namespace(a=1)}, path)
    with pytest.raises(CheckpointError, match="not a hardmine checkpoint") as error:
        checkpoint.load(path)
    assert "weights_only" not in str(error.value) and "\n" not in str(error.value)
