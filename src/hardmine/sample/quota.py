"""The one sampling mechanism: quotas per (image, group) segment of a flat batch.

Every sampler in hardmine says how it splits candidates into groups, how it weights or scores them,
and how many each group gets; this module does the picking, for all images of a batch at once, with
no Python loop over images or groups and no host synchronisation (a GPU step never waits for
the host).

A *flat batch* concatenates the candidates of all images. ``segment[i]`` names the group that
candidate ``i`` belongs to (usually ``image * num_groups + group``), or is negative when the
candidate may not be picked at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import accumulate

import torch
from torch import Tensor

from hardmine._host import host_tensor
from hardmine._segments import count_per_segment, segment_rank  # noqa: F401 (the samplers' import)
from hardmine.structures import Assignment, Selection


@dataclass(frozen=True, eq=False)
class FlatBatch:
    """The assignments of a batch concatenated, with each candidate's image index.

    Only ``label`` is concatenated up front; the other fields are built on first use, so a sampler
    pays for what it reads (random sampling reads the labels only).

    Attributes:
        label, gt_index, max_iou, gt_class: the ``Assignment`` fields, concatenated, ``[N]``.
        image: ``int64 [N]``: which image each candidate belongs to.
        position: ``int64 [N]``: each candidate's index within its image.
        starts: ``int64 [B]``: where each image's candidates begin.
        sizes: candidates per image (host ints: known from the shapes, no sync).
    """

    label: Tensor
    sizes: list[int]
    assignments: tuple[Assignment, ...] = field(repr=False)

    @cached_property
    def gt_index(self) -> Tensor:
        return torch.cat([a.gt_index for a in self.assignments])

    @cached_property
    def max_iou(self) -> Tensor:
        return torch.cat([a.max_iou for a in self.assignments])

    @cached_property
    def gt_class(self) -> Tensor:
        return torch.cat([a.gt_class for a in self.assignments])

    @cached_property
    def bounds(self) -> Tensor:
        """``int64 [B + 1]``: where each image's candidates begin, then the total."""
        return host_tensor([0, *accumulate(self.sizes)], self.device, torch.int64)

    @property
    def starts(self) -> Tensor:
        return self.bounds[:-1]

    @cached_property
    def image(self) -> Tensor:
        counts = self.bounds.diff()
        # output_size spares CUDA the sync that sizing the result from a device tensor would need.
        return torch.repeat_interleave(
            torch.arange(self.num_images, device=self.device), counts, output_size=self.total
        )

    @cached_property
    def position(self) -> Tensor:
        counts = self.bounds.diff()
        start_of = torch.repeat_interleave(self.starts, counts, output_size=self.total)
        return torch.arange(self.total, device=self.device) - start_of

    @property
    def total(self) -> int:
        """Candidates in the batch."""
        return self.label.shape[0]

    @property
    def max_size(self) -> int:
        """Candidates in the largest image."""
        return max(self.sizes)

    @property
    def num_images(self) -> int:
        return len(self.sizes)

    @property
    def device(self) -> torch.device:
        return self.label.device

    def segment(self, group: Tensor, num_groups: int) -> Tensor:
        """``image * num_groups + group`` where ``group >= 0``, else -1: ``int64 [N]``."""
        return torch.where(group >= 0, self.image * num_groups + group, -1)

    def count(self, mask: Tensor) -> Tensor:
        """``mask`` entries per image: ``int64 [B]``.

        A running count read at the image bounds: two cheap passes, where a ``scatter_add`` by
        image costs the CPU several times more.
        """
        return _count_between(mask[None], self.bounds)[0]

    def per_image(self, values: Tensor) -> Tensor:
        """Broadcast a per-image ``[B]`` tensor to the candidates: ``[N]``."""
        return values[self.image]

    def cat(self, values: Sequence[Tensor], name: str) -> Tensor:
        """Concatenate per-image ``values`` (boxes ``[N_i, 4]``, losses ``[N_i]``) in batch order.

        Raises:
            ValueError: if the number of images or any image's ``N_i`` disagrees with the batch.
        """
        if len(values) != self.num_images:
            raise ValueError(f"{name}: got {len(values)} images, expected {self.num_images}")
        for i, (v, n) in enumerate(zip(values, self.sizes, strict=True)):
            if v.shape[0] != n:
                raise ValueError(f"{name}[{i}]: got {v.shape[0]} rows, expected {n} candidates")
        return torch.cat(list(values))

    def check(self, check: Callable[[Tensor, str], None], values: Tensor, name: str) -> None:
        """``check(values, name)`` on flat ``values`` (``hardmine.boxes.check_boxes`` or
        ``check_finite``): one pass and one sync for the batch; where it fails, the error names
        the first image that fails it, ``name[i]``."""
        try:
            check(values, name)
        except ValueError:
            for i, part in enumerate(values.split(self.sizes)):
                check(part, f"{name}[{i}]")
            raise

    def split(self, mask: Tensor, weight: Tensor | None = None) -> list[Selection]:
        """Cut flat ``mask`` / ``weight`` back into one ``Selection`` per image."""
        if weight is None:
            weight = mask.to(self.assignments[0].max_iou.dtype)
        return [
            Selection(mask=m, weight=w)
            for m, w in zip(mask.split(self.sizes), weight.split(self.sizes), strict=True)
        ]


def check_call(
    boxes: Sequence[Tensor], assignments: Sequence[Assignment], generator: object = None
) -> None:
    """The checks every sampler's ``__call__`` makes of its arguments: one boxes tensor per
    assignment (a sampler that reads only the assignments would otherwise pick for some images
    silently), and a ``torch.Generator`` or None (not torch's argument error from deep inside).

    Raises:
        ValueError: ``len(boxes) != len(assignments)``.
        TypeError: ``generator`` is neither a ``torch.Generator`` nor None.
    """
    if len(boxes) != len(assignments):
        raise ValueError(
            f"boxes has {len(boxes)} images and assignments {len(assignments)}; expected one "
            "of each per image"
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )


def flatten(assignments: Sequence[Assignment]) -> FlatBatch:
    """Concatenate per-image assignments into a ``FlatBatch``."""
    if len(assignments) == 0:
        raise ValueError("expected at least one image's assignment, got an empty batch")
    return FlatBatch(
        label=torch.cat([a.label for a in assignments]),
        sizes=[a.num_candidates for a in assignments],
        assignments=tuple(assignments),
    )


def _count_between(member: Tensor, bounds: Tensor) -> Tensor:
    """``member: bool [G, N]`` -> ``int64 [G, B]`` members between consecutive ``bounds``."""
    return _counts_from_running(member.cumsum(1), bounds)


def _counts_from_running(running: Tensor, bounds: Tensor) -> Tensor:
    """Running counts ``int64 [G, N]`` (inclusive) -> members per image ``int64 [G, B]``."""
    if running.shape[1] == 0:
        return running.new_zeros(running.shape[0], bounds.shape[0] - 1)
    # The running count before bounds[b] is the inclusive count at bounds[b] - 1 (0 before 0).
    at = running.index_select(1, (bounds - 1).clamp(min=0)) * (bounds > 0)  # [G, B + 1]
    return at.diff(dim=1)


_NEVER = torch.iinfo(torch.int64).min
_ALWAYS = torch.iinfo(torch.int64).max


def _ranking_keys(keys: Tensor, position: Tensor) -> Tensor:
    """``float [N]`` keys -> ``int64 [N]`` keys in the same order, unique within an image.

    The float's bits become an order-preserving integer (flip all but the sign bit of negatives)
    in the high 32 bits; the low 32 bits prefer the lower position. So ties go to the lower index,
    exactly and on every device, which a float ``topk`` does not promise.
    """
    bits = keys.to(torch.float32).contiguous().view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed-int order == float order
    return ordered.to(torch.int64) * (1 << 32) + ((1 << 32) - 1 - position)


def take_top(
    flat: FlatBatch,
    keys: Tensor,
    group: Tensor,
    quota: Tensor,
    *,
    max_quota: int | None = None,
) -> Tensor:
    """In every image and group, pick the ``quota`` candidates with the largest keys.

    The batch becomes a table with one row per (image, group) and one column per position in the
    image, ``[B * G, N_max]``, and one ``topk`` over its rows picks for every image and group at
    once. Each row also gets ``k - quota`` entries that beat every key, so an unsorted ``topk(k)``
    (a linear-time selection, no sort of the flat batch nor of the picks) returns exactly the
    row's ``quota`` best candidates beside them. ``k`` is ``max_quota``, so the work is about
    ``G * (N + B * max_quota)``.

    Args:
        flat: the batch.
        keys: ``float [N]``; ``-inf`` is never picked.
        group: ``int64 [N]`` in ``[0, G)``, negative for candidates that may not be picked.
        quota: ``int64 [B, G]``: how many to pick per image and group (more than the group holds
            takes all).
        max_quota: a bound on ``quota`` known on the host (e.g. ``num``); tighter is faster.
            Defaults to the longest image.

    Returns:
        ``bool [N]``. Ties go to the lower index, so the result is deterministic.
    """
    usable = (group >= 0) & (keys > float("-inf"))
    ranked = torch.where(usable, _ranking_keys(keys, flat.position), _NEVER)
    return _take_ranked(flat, ranked, group, quota, max_quota)


def _take_ranked(
    flat: FlatBatch, ranked: Tensor, group: Tensor, quota: Tensor, max_quota: int | None
) -> Tensor:
    """``take_top`` on ``int64`` keys unique within each image; ``_NEVER`` is never taken."""
    num_groups = quota.shape[1]
    n, length = ranked.numel(), flat.max_size
    k = length if max_quota is None else min(max_quota, length)
    if ranked.device.type == "cpu" and quota.numel():
        # Where a sync is free, the largest quota bounds k tighter than the caller's bound: a
        # narrower table and a smaller topk, the same picks (a shortfall top-up is often 0).
        k = min(k, int(quota.max()))
    if n == 0 or k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=ranked.device)
    rows, width = flat.num_images * num_groups, length + k
    table = torch.full((rows, width), _NEVER, device=ranked.device)  # [B * G, N_max + k]
    # Each cell (image, g, position) has one owner, the candidate at that position, so the
    # unusable writing _NEVER into their group-0 row clobbers nobody.
    cell = (flat.image * num_groups + group.clamp(min=0)) * width + flat.position
    table.view(-1).scatter_(0, cell, ranked)
    rank = torch.arange(k, device=ranked.device)
    spare = k - quota.reshape(-1, 1).clamp(0, k)  # [B * G, 1]
    table[:, length:] = torch.where(rank < spare, _ALWAYS, _NEVER)
    values, cols = table.topk(k, dim=1, sorted=False)  # [B * G, k]
    take = (cols < length) & (values > _NEVER)
    row_start = flat.starts.repeat_interleave(num_groups)  # [B * G]
    index = torch.where(take, row_start[:, None] + cols, n)  # n: a spare slot for the unpicked
    mask = torch.zeros(n + 1, dtype=torch.bool, device=ranked.device)
    return mask.scatter_(0, index.flatten(), True)[:n]


def random_keys(
    weight: Tensor | None,
    *,
    like: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Random keys whose top k are a draw without replacement.

    Uniform (``weight=None``): the keys are ``u ~ U[0, 1)``. Weighted: Efraimidis–Spirakis keys
    ``log(u) / w = -E / w`` with ``E ~ Exp(1)``; weight 0 gives ``-inf`` (never drawn).

    Args:
        weight: ``float [N] >= 0``, or ``None`` for uniform.
        like: a ``[N]`` tensor giving the size and device.
        generator: makes the keys reproducible.

    Returns:
        ``float32 [N]``.
    """
    if weight is None:
        return torch.rand(like.shape, generator=generator, device=like.device)
    e = torch.empty(like.shape, device=like.device).exponential_(generator=generator)
    w = weight.to(torch.float32)
    return torch.where(w > 0, -e / w, float("-inf"))


def draw(
    flat: FlatBatch,
    weight: Tensor | None,
    group: Tensor,
    quota: Tensor,
    *,
    max_quota: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw without replacement ``quota[b, g]`` candidates per image and group.

    Args:
        flat: the batch.
        weight: ``float [N] >= 0``, pick probability proportional to it (0 is never drawn), or
            ``None`` for a uniform draw.
        group: ``int64 [N]`` in ``[0, G)``, negative for candidates that may not be drawn.
        quota: ``int64 [B, G]``.
        max_quota: a host bound on ``quota`` (see ``take_top``).
        generator: makes the draw reproducible; must live on the batch's device.

    Returns:
        ``bool [N]``.
    """
    if weight is None:
        # Random 62-bit integers rank a uniform draw directly: no float keys to convert, and
        # ties, which only the tie-break could decide, have probability about N^2 / 2^63.
        ranked = torch.randint(
            1 << 62, flat.image.shape, generator=generator, device=flat.image.device
        )
        return _take_ranked(flat, torch.where(group >= 0, ranked, _NEVER), group, quota, max_quota)
    keys = random_keys(weight, like=flat.max_iou, generator=generator)
    return take_top(flat, keys, group, quota, max_quota=max_quota)


def draw_uniform(
    flat: FlatBatch,
    member: Tensor,
    *,
    caps: Sequence[int],
    total: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw uniformly without replacement from each image's groups, in order, up to ``total``.

    Group ``g`` of every image gets ``min(its members, caps[g], total - the earlier groups'
    draws)``: torchvision's ``BalancedPositiveNegativeSampler`` with groups (positive, negative)
    and caps ``(num * pos_fraction, num)``.

    On the CPU the draw is torchvision's too: for each image, for each group in order, one
    ``randperm`` over the group's members (in index order), of which the first quota are drawn;
    from the same generator state, the same picks. The permutations cost little where ranking
    random keys over the batch (``draw``) costs a sort-like selection per group; the loop over
    images and groups needs the counts on the host, a sync that is free on a CPU. Elsewhere
    (CUDA) it is ``draw`` with random keys: the same distribution, no host synchronisation.

    Args:
        flat: the batch.
        member: ``bool [G, N]``: the groups, disjoint.
        caps: ``G`` host ints, the most each group may get per image.
        total: the most all groups together may get per image.
        generator: makes the draw reproducible; must live on the batch's device.

    Returns:
        ``bool [N]``.
    """
    num_groups, n = member.shape
    if len(caps) != num_groups:
        raise ValueError(f"expected one cap per group ({num_groups}), got {len(caps)}")
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=member.device)
    if flat.device.type == "cpu":
        return _draw_permuted(flat, member, caps, total, generator)
    return _draw_keyed(flat, member, caps, total, generator)


def _draw_keyed(
    flat: FlatBatch,
    member: Tensor,
    caps: Sequence[int],
    total: int,
    generator: torch.Generator | None,
) -> Tensor:
    """``draw_uniform`` without host synchronisation: ``draw`` with random keys."""
    num_groups = member.shape[0]
    counts = _count_between(member, flat.bounds)  # [G, B]
    left, quota = torch.full_like(counts[0], total), []
    for g, cap in enumerate(caps):
        quota.append(counts[g].clamp(max=cap).minimum(left))
        left = left - quota[-1]
    number = torch.arange(1, num_groups + 1, device=member.device)[:, None]  # [G, 1]
    group = (member * number).sum(0) - 1  # [N], -1 outside every group
    max_quota = min(total, max(caps))
    return draw(flat, None, group, torch.stack(quota, 1), max_quota=max_quota, generator=generator)


def _draw_permuted(
    flat: FlatBatch,
    member: Tensor,
    caps: Sequence[int],
    total: int,
    generator: torch.Generator | None,
) -> Tensor:
    """``draw_uniform`` on the CPU: one ``randperm`` per image and group (torchvision's)."""
    num_groups, n = member.shape
    running = member.cumsum(1)  # [G, N]: each member's number in its group (1-based)
    ends = list(accumulate(flat.sizes))
    at_end = running.index_select(1, torch.tensor([max(e - 1, 0) for e in ends])).tolist()
    # A table of flags per group, a slot per member by its number (slot 0 is never drawn): the
    # drawn members are flagged, then every candidate reads its own flag.
    width = max(row[-1] for row in at_end) + 1
    drawn, before = [], [0] * num_groups
    for b, end in enumerate(ends):
        left = total
        for g in range(num_groups):
            count = at_end[g][b] - before[g] if end else 0
            quota = max(min(count, caps[g], left), 0)
            # randperm even where nothing is drawn, so the stream stays torchvision's.
            perm = torch.randperm(count, generator=generator)
            if quota:
                drawn.append(perm[:quota].add_(g * width + before[g] + 1))
            before[g] += count
            left -= quota
    table = torch.zeros(num_groups * width, dtype=torch.bool)
    if drawn:
        table.index_fill_(0, torch.cat(drawn), True)
    for g in range(1, num_groups):
        running[g] += g * width
    flags = table.index_select(0, running.view(-1)).view(num_groups, n) & member
    mask = flags[0]
    for g in range(1, num_groups):  # cheaper than any(0) over a few rows
        mask = mask | flags[g]
    return mask


def take_top_in_segments(keys: Tensor, segment: Tensor, quota: Tensor) -> Tensor:
    """``take_top`` for segments that are not (image, group) pairs, e.g. one per ground truth.

    Sorts, so it costs ``N log N`` in the usable candidates: on the CPU, where a host sync is
    free, it first drops the unusable ones (usually most: it serves the positives).

    Args:
        keys: ``float [N]``; ``-inf`` is never picked.
        segment: ``int64 [N]`` in ``[0, S)``, or negative for candidates that may not be picked.
        quota: ``int64 [S]``.

    Returns:
        ``bool [N]``. Ties go to the lower index.
    """
    n, num_segments = keys.numel(), quota.numel()
    usable = (segment >= 0) & (keys > float("-inf"))
    if keys.device.type == "cpu":
        index = torch.nonzero(usable).flatten()
        picked = _take_top_sorted(keys[index], segment[index], quota, num_segments)
        return torch.zeros(n, dtype=torch.bool).index_put_((index,), picked)
    seg = torch.where(usable, segment, num_segments)  # the unusable go to an overflow segment
    return _take_top_sorted(keys, seg, quota, num_segments)


def _take_top_sorted(keys: Tensor, seg: Tensor, quota: Tensor, num_segments: int) -> Tensor:
    n = keys.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=keys.device)
    # seg may hold the overflow segment num_segments, whose quota is 0.
    order, rank, _ = segment_rank(seg, num_segments + 1, keys)
    sorted_seg = seg[order]
    quota_ext = torch.cat([quota.to(torch.int64), quota.new_zeros(1, dtype=torch.int64)])
    mask = torch.zeros(n, dtype=torch.bool, device=keys.device)
    mask[order] = rank < quota_ext[sorted_seg]
    return mask


def segment_by_key(image: Tensor, key: Tensor, mask: Tensor) -> Tensor:
    """One segment per distinct ``(image, key)`` pair among the ``mask`` candidates.

    Groups whose number is data-dependent (one per ground truth) get dense ids without a host
    sync: sort by ``(image, key)`` and number the runs. The ids are ordered by ``(image, key)``.
    On the CPU, where a sync is free, only the ``mask`` candidates are sorted.

    Args:
        image: ``int64 [N]``.
        key: ``int64 [N]``, e.g. ``gt_index``.
        mask: ``bool [N]``, the candidates to group.

    Returns:
        ``int64 [N]``: ids in ``[0, N)`` where ``mask``, -1 elsewhere; ``N`` segments suffice.
    """
    if key.device.type == "cpu":
        index = torch.nonzero(mask).flatten()
        segment = torch.full_like(key, -1)
        segment[index] = _number_runs(image[index], key[index], torch.ones_like(index, dtype=bool))
        return segment
    return _number_runs(image, key, mask)


def _number_runs(image: Tensor, key: Tensor, mask: Tensor) -> Tensor:
    n = key.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=key.device)
    order = torch.argsort(key, stable=True)
    order = order[torch.argsort(image[order], stable=True)]
    order = order[torch.argsort(~mask[order], stable=True)]  # the masked ones first
    img, k, m = image[order], key[order], mask[order]
    new_run = m.clone()
    new_run[1:] &= (img[1:] != img[:-1]) | (k[1:] != k[:-1])
    segment = torch.empty_like(order)
    segment[order] = torch.where(m, torch.cumsum(new_run, 0) - 1, -1)
    return segment


def fill_shortfall(
    flat: FlatBatch,
    picked: Tensor,
    eligible: Tensor,
    target: Tensor,
    *,
    weight: Tensor | None = None,
    max_quota: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Top up each image to ``target`` picks from the ``eligible`` candidates not yet picked.

    Args:
        flat: the batch.
        picked: ``bool [N]``, the picks so far (all of them count against ``target``).
        eligible: ``bool [N]``, the fallback group.
        target: ``int64 [B]``, the wanted number of picks per image.
        weight: ``float [N]`` draw weights for the fallback (uniform by default).
        max_quota: a host bound on ``target`` (see ``take_top``).
        generator: makes the draw reproducible.

    Returns:
        ``bool [N]``: ``picked`` plus the top-up.
    """
    shortfall = (target - flat.count(picked)).clamp(min=0)
    group = torch.where(eligible & ~picked, 0, -1)
    top_up = draw(flat, weight, group, shortfall[:, None], max_quota=max_quota, generator=generator)
    return picked | top_up
