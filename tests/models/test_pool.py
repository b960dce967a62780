"""RoI-align over the CPU's threads (outside autograd): torchvision's pooler's values."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from hardmine.models import _pool
from hardmine.models._pool import pool_flat
from hardmine.models._roi_align import to_rois

SIZES = [(256, 320), (256, 256)]


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _inputs(seed: int, n: int, max_side: float = 120.0):
    g = torch.Generator().manual_seed(seed)
    features = {
        name: torch.randn(2, 8, 256 // s, 320 // s, generator=g)
        for name, s in (("0", 4), ("1", 8), ("2", 16), ("3", 32))
    }
    boxes = []
    for h, w in SIZES:
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
        wh = 1 + torch.rand(n, 2, generator=g) * max_side
        boxes.append(torch.cat([xy, torch.minimum(xy + wh, torch.tensor([w, h]))], 1))
    return features, boxes


def _pooler() -> MultiScaleRoIAlign:
    return MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)


@pytest.mark.usefixtures("two_threads")
def test_equals_torchvision_bitwise():
    features, boxes = _inputs(0, 300)
    pool = _pooler()
    with torch.no_grad():
        expected = pool(features, boxes, SIZES)
        assert torch.equal(pool_flat(pool, features, to_rois(boxes), SIZES), expected)
        # Flat RoIs in any image order come back in their own order.
        rois = to_rois(boxes)
        perm = torch.randperm(rois.shape[0], generator=torch.Generator().manual_seed(1))
        assert torch.equal(pool_flat(pool, features, rois[perm], SIZES), expected[perm])


def _count_pooler_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = MultiScaleRoIAlign.forward
    monkeypatch.setattr(MultiScaleRoIAlign, "forward", lambda *a: calls.append(1) or original(*a))
    return calls


@pytest.mark.usefixtures("two_threads")
def test_with_gradients_it_is_the_pooler_itself(monkeypatch):
    # Shares' backward passes would each allocate a whole feature map's gradient: not worth it.
    features, boxes = _inputs(1, 200)
    calls = _count_pooler_calls(monkeypatch)
    feats = {k: v.clone().requires_grad_() for k, v in features.items()}
    out = pool_flat(_pooler(), feats, to_rois(boxes), SIZES)
    assert calls == [1] and out.grad_fn is not None
    with torch.no_grad():
        pool_flat(_pooler(), features, to_rois(boxes), SIZES)
    assert calls == [1, 1]  # the first use sets the scales; then the threads pool


def test_one_thread_pools_in_the_calling_thread(monkeypatch):
    features, boxes = _inputs(2, 200)
    with torch.no_grad():
        expected = _pooler()(features, boxes, SIZES)
    calls = _count_pooler_calls(monkeypatch)

    def no_threads(width):
        raise AssertionError("the thread pool was used")

    monkeypatch.setattr(_pool, "_threads", no_threads)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            got = pool_flat(_pooler(), features, to_rois(boxes), SIZES)
    finally:
        torch.set_num_threads(before)
    assert calls == [1]  # only torchvision's setting up of the scales
    assert torch.equal(got, expected)


@pytest.mark.usefixtures("two_threads")
def test_pooler_names_missing_from_the_features_are_left_out():
    # MobileNetV3's FPN gives "0", "1" and "pool" to a pooler of "0" to "3": torchvision pools
    # the names present, in the features' order (KeyError '2' before).
    features, boxes = _inputs(3, 200)
    present = {"0": features["0"], "1": features["1"], "pool": features["3"]}
    for names in (["0", "1", "2", "3"], ["pool", "0"]):
        pool = MultiScaleRoIAlign(names, 7, 2)
        with torch.no_grad():
            expected = pool(present, boxes, SIZES)
            assert torch.equal(pool_flat(pool, present, to_rois(boxes), SIZES), expected)
