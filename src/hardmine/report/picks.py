"""What each sampler picks, and where its negatives lie: IoU histograms of the picked negatives.

Two quantities per picked negative, the axes of the papers' arguments:

- its IoU with the ground truth (``Assignment.max_iou``): Libra R-CNN (Pang et al., CVPR 2019,
  Fig. 2) shows that random sampling spends most of its negatives near IoU 0 and misses the hard
  ones just below the negative threshold;
- its IoU with the positives, IoU(p,n) (``hardmine.sample.overlap_with_positives``, the value the
  overlap sampler draws by): the Overlap Sampler paper (Chen et al., WACV 2020, Fig. 4) shows that
  random and IoU-balanced sampling pick few negatives that overlap a positive much, the overlap
  sampler many.

Pure functions of boxes, assignments and selections: no model. Plots use ``matplotlib.figure``
(no ``pyplot`` state), which renders with the Agg backend and needs no display.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from hardmine.sample import overlap_with_positives
from hardmine.sample.quota import flatten
from hardmine.structures import Assignment, RoIScores, Sampler, Selection

#: The key under which ``iou_histograms`` counts all negatives, the pool the samplers draw from.
ALL_NEGATIVES = "all negatives"
QUANTITIES = ("iou_gt", "iou_pn")
_LABELS = {"iou_gt": "IoU with the ground truth", "iou_pn": "IoU(p,n): IoU with the positives"}


def collect_picks(
    boxes: Sequence[Tensor],
    assignments: Sequence[Assignment],
    samplers: Mapping[str, Sampler],
    *,
    losses: Sequence[Tensor] | None = None,
    scores: Sequence[RoIScores] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, list[Selection]]:
    """Run every sampler on the same candidates.

    Each sampler draws from its own copy of ``generator``'s state, so a sampler's picks do not
    depend on which other samplers run or in what order; ``generator`` itself is not advanced.

    Args:
        boxes: per image, ``float [N_i, 4]`` candidates.
        assignments: per image, the candidates' assignment.
        samplers: name -> sampler.
        losses: per image, ``float [N_i]`` per-candidate losses, for samplers that need them
            (OHEM).
        scores: per image, the read-only pass's ``RoIScores``, for samplers with
            ``needs_scores`` (PISA).
        generator: seeds the random samplers; ``None`` draws from torch's global RNG.

    Returns:
        name -> one ``Selection`` per image.

    Raises:
        ValueError: a sampler needs losses and ``losses`` is None, or scores and ``scores`` is
            None.
    """
    picks: dict[str, list[Selection]] = {}
    for name, sampler in samplers.items():
        if sampler.needs_losses and losses is None:
            raise ValueError(f"sampler {name!r} needs per-candidate losses; got losses=None")
        extra = {}
        if getattr(sampler, "needs_scores", False):
            if scores is None:
                raise ValueError(f"sampler {name!r} needs the RoIs' scores; got scores=None")
            extra["scores"] = scores
        own = None
        if generator is not None:
            own = torch.Generator(generator.device)
            own.set_state(generator.get_state())
        picks[name] = sampler(boxes, assignments, losses=losses, generator=own, **extra)
    return picks


def overlap_of_candidates(
    boxes: Sequence[Tensor], assignments: Sequence[Assignment]
) -> list[Tensor]:
    """Every candidate's IoU(p,n): its largest IoU with a positive candidate of its image.

    The overlap sampler's definition (``sample_overlap``): positives are all candidates labelled
    positive, ground-truth copies included, not only the picked ones.

    Returns:
        Per image, ``float [N_i]``.
    """
    flat = flatten(assignments)
    iou_pn, _ = overlap_with_positives(flat.cat(boxes, "boxes"), flat, flat.label == 1)
    return list(iou_pn.split(flat.sizes))


@dataclass(frozen=True)
class Histograms:
    """Counts of negatives per IoU bin, for each sampler's picks and for all negatives.

    Attributes:
        edges: ``float [K + 1]`` bin edges over ``[0, 1]``; the last bin includes 1.
        counts: quantity (``"iou_gt"``, ``"iou_pn"``) -> name -> ``int64 [K]``. Names are the
            samplers' and ``ALL_NEGATIVES``.
    """

    edges: np.ndarray
    counts: dict[str, dict[str, np.ndarray]]

    @property
    def names(self) -> list[str]:
        return list(self.counts["iou_gt"])

    def total(self, name: str) -> int:
        """How many negatives ``name`` counts."""
        return int(self.counts["iou_gt"][name].sum())

    def share(self, quantity: str, name: str, low: float, high: float = 1.0) -> float:
        """The fraction of ``name``'s negatives whose ``quantity`` lies in the bins covering
        ``[low, high)`` (``high = 1`` includes 1); NaN when it counts none.

        Raises:
            ValueError: ``low`` or ``high`` is not a bin edge.
        """
        lo, hi = (int(np.flatnonzero(np.isclose(self.edges, v))[0]) for v in (low, high))
        counts = self.counts[quantity][name]
        total = counts.sum()
        return float(counts[lo:hi].sum() / total) if total else float("nan")


def iou_histograms(
    boxes: Sequence[Tensor],
    assignments: Sequence[Assignment],
    picks: Mapping[str, Sequence[Selection]],
    *,
    num_bins: int = 10,
) -> Histograms:
    """Histograms of the picked negatives' IoU with the ground truth and with the positives.

    Args:
        boxes: per image, ``float [N_i, 4]`` candidates.
        assignments: per image, the candidates' assignment.
        picks: sampler name -> per image its ``Selection`` (``collect_picks``).
        num_bins: equal bins over ``[0, 1]``.

    Returns:
        The counts; each sampler's sum to its number of picked negatives.
    """
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    negative = torch.cat([a.negative for a in assignments]).cpu()
    values = {
        "iou_gt": torch.cat([a.max_iou for a in assignments]).cpu(),
        "iou_pn": torch.cat(overlap_of_candidates(boxes, assignments)).cpu(),
    }
    masks = {ALL_NEGATIVES: negative}
    for name, selections in picks.items():
        masks[name] = torch.cat([s.mask for s in selections]).cpu() & negative
    counts = {
        quantity: {
            name: np.histogram(v[m].double().numpy(), bins=edges)[0] for name, m in masks.items()
        }
        for quantity, v in values.items()
    }
    return Histograms(edges=edges, counts=counts)


def write_histograms_csv(histograms: Histograms, path: str | Path) -> Path:
    """One row per (quantity, name, bin): ``quantity, sampler, bin_low, bin_high, count, fraction``.

    ``fraction`` is the count over that name's negatives (0 when it has none).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    edges = histograms.edges
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["quantity", "sampler", "bin_low", "bin_high", "count", "fraction"])
        for quantity, per_name in histograms.counts.items():
            for name, counts in per_name.items():
                total = max(int(counts.sum()), 1)
                for k, count in enumerate(counts.tolist()):
                    writer.writerow(
                        [
                            quantity,
                            name,
                            f"{edges[k]:.2f}",
                            f"{edges[k + 1]:.2f}",
                            count,
                            f"{count / total:.6f}",
                        ]
                    )
    return path


def plot_histograms(histograms: Histograms, path: str | Path) -> Path:
    """Two panels of grouped bars, the fraction of each sampler's picked negatives per IoU bin:
    IoU with the ground truth (left) and IoU(p,n) (right); all negatives in grey for reference.
    """
    names = histograms.names
    edges = histograms.edges
    centres = (edges[:-1] + edges[1:]) / 2
    width = (edges[1] - edges[0]) * 0.85 / len(names)
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, quantity in zip(axes, QUANTITIES, strict=True):
        for i, name in enumerate(names):
            counts = histograms.counts[quantity][name]
            fraction = counts / max(int(counts.sum()), 1)
            offset = (i - (len(names) - 1) / 2) * width
            colour = "0.6" if name == ALL_NEGATIVES else None
            label = f"{name} ({histograms.total(name)})"
            ax.bar(centres + offset, fraction, width, color=colour, label=label)
        ax.set_xticks(edges)
        ax.set_xlim(0, 1)
        ax.set_xlabel(_LABELS[quantity])
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("fraction of picked negatives")
    axes[1].legend(title="sampler (negatives)", fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
