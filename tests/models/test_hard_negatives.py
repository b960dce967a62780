"""Every sampler trains on targets with and without offline-mined hard negatives.

The ``Sampler`` protocol carries ``mined`` beside ``losses``: a plain sampler accepts the flags and
ignores them (the mined boxes are then ordinary background candidates), ``MinedNegativeSampler``
gives them their share.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor

from hardmine.models import build
from hardmine.sample import SAMPLERS, MinedNegativeSampler
from hardmine.structures import Assignment, RoIScores, Sampler, Selection

MINED = torch.tensor([[100.0, 5.0, 140.0, 25.0], [0.0, 90.0, 30.0, 125.0]])


@dataclass
class Recorder:
    """Passes everything on to ``sampler`` and remembers the ``mined`` flags it was given."""

    sampler: Sampler
    mined: list[list[Tensor] | None] = field(default_factory=list)

    @property
    def needs_losses(self) -> bool:
        return self.sampler.needs_losses

    @property
    def needs_scores(self) -> bool:
        return getattr(self.sampler, "needs_scores", False)

    def __call__(
        self,
        boxes: list[Tensor],
        assignments: list[Assignment],
        *,
        losses: list[Tensor] | None = None,
        mined: list[Tensor] | None = None,
        generator: torch.Generator | None = None,
        **scores: list[RoIScores],
    ) -> list[Selection]:
        self.mined.append(mined)
        return self.sampler(
            boxes, assignments, losses=losses, mined=mined, generator=generator, **scores
        )


def _samplers() -> list[tuple[str, Sampler]]:
    plain = [(name, cls(num=32)) for name, cls in SAMPLERS.items()]
    wrapped = [(f"mined({name})", MinedNegativeSampler(s, share=0.5)) for name, s in plain]
    return plain + wrapped


@pytest.mark.parametrize("with_mined", [False, True], ids=["plain-targets", "hard-negatives"])
@pytest.mark.parametrize(("name", "sampler"), _samplers(), ids=[n for n, _ in _samplers()])
def test_every_sampler_with_and_without_hard_negatives(batch, name, sampler, with_mined) -> None:
    images, targets = batch
    targets = copy.deepcopy(targets)
    if with_mined:
        targets[0]["hard_negatives"] = MINED.clone()
        targets[1]["hard_negatives"] = MINED[:1].clone()
    recorder = Recorder(sampler)
    torch.manual_seed(0)
    model = build("faster_rcnn_tiny", 3, sampler=recorder, generator=torch.Generator())
    model.train()
    losses = model(images, targets)
    assert all(math.isfinite(float(v.detach())) for v in losses.values())
    (mined,) = recorder.mined
    if not with_mined:
        assert mined is None
    else:
        assert [int(m.sum()) for m in mined] == [2, 1]  # appended after the proposals
        assert all(bool(m[-k:].all()) for m, k in zip(mined, (2, 1), strict=True))
