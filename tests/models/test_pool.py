"""RoI-align over the CPU's threads: torchvision's pooler's values, and its gradients."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from hardmine.models._pool import pool_flat, pool_rois, to_rois

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
        assert torch.equal(pool_rois(pool, features, boxes, SIZES), expected)
        # Flat RoIs in any image order come back in their own order.
        rois = to_rois(boxes)
        perm = torch.randperm(rois.shape[0], generator=torch.Generator().manual_seed(1))
        assert torch.equal(pool_flat(pool, features, rois[perm], SIZES), expected[perm])


@pytest.mark.usefixtures("two_threads")
def test_gradients_equal_torchvision_and_every_level_is_in_the_graph():
    # Small boxes only: levels "2" and "3" get no RoIs, yet get a (zero) gradient as with
    # torchvision, which keeps DDP's every-parameter-used check content.
    features, boxes = _inputs(1, 200, max_side=40.0)
    pool = _pooler()
    weight = None
    grads = []
    for fn in (pool, lambda *a: pool_rois(pool, *a)):
        feats = {k: v.clone().requires_grad_() for k, v in features.items()}
        out = fn(feats, boxes, SIZES)
        weight = torch.randn_like(out, generator=torch.Generator().manual_seed(2))
        (out * weight).sum().backward()
        grads.append({k: v.grad for k, v in feats.items()})
    expected, got = grads
    for name in expected:
        assert got[name] is not None, name
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5)
    assert float(got["3"].abs().sum()) == 0 and float(got["0"].abs().sum()) > 0


def test_one_thread_or_few_rois_call_the_pooler_itself(monkeypatch):
    features, boxes = _inputs(2, 40)
    pool = _pooler()
    calls = []
    original = MultiScaleRoIAlign.forward
    monkeypatch.setattr(MultiScaleRoIAlign, "forward", lambda *a: calls.append(1) or original(*a))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            pool_rois(pool, features, boxes, SIZES)
    finally:
        torch.set_num_threads(before)
    assert calls == [1]
