"""MMDetection 3.x's own assigners and samplers as reference contenders, when it is installed.

``benchmarks/samplers.py`` times them on the same inputs as hardmine's. MMDetection is never a
dependency of hardmine: install it in a separate environment, e.g.::

    python -m venv /tmp/mm && /tmp/mm/bin/pip install torch torchvision
    /tmp/mm/bin/pip install mmengine "mmdet==3.3.0" "mmcv-lite>=2.0.0rc4,<2.2.0"
    PYTHONPATH=src /tmp/mm/bin/python benchmarks/samplers.py

``mmcv-lite`` is mmcv without its compiled operators, which these classes never call; but
``mmdet.models``' package imports every detector (and so the operators), and
``mmdet.structures.mask`` imports ``mmcv.ops.roi_align``. Where those imports fail, ``load``
imports the assigner and sampler modules alone, with a stand-in for ``mmcv.ops.roi_align`` that
raises if anything calls it.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from dataclasses import dataclass
from typing import Any

from torch import Tensor

_TASK = "mmdet.models.task_modules"
_MODULES = {
    "ATSSAssigner": "assigners.atss_assigner",
    "MaxIoUAssigner": "assigners.max_iou_assigner",
    "CombinedSampler": "samplers.combined_sampler",
    "RandomSampler": "samplers.random_sampler",
}
# Registered by import: what the classes above build by name.
_REGISTERED = [
    "assigners.iou2d_calculator",
    "samplers.instance_balanced_pos_sampler",
    "samplers.iou_balanced_neg_sampler",
]


@dataclass
class MMDet:
    """MMDetection's classes and ``InstanceData``; ``version`` is ``mmdet.__version__``."""

    version: str
    classes: dict[str, type]
    instance_data: type

    def priors(self, boxes: Tensor) -> Any:
        return self.instance_data(priors=boxes, bboxes=boxes)

    def gts(self, boxes: Tensor, labels: Tensor) -> Any:
        return self.instance_data(bboxes=boxes, labels=labels)


def _package_stub(name: str, path: str) -> None:
    module = types.ModuleType(name)
    module.__path__ = [path]
    sys.modules[name] = module


def _load_modules_alone() -> dict[str, type]:
    """The task modules without ``mmdet.models``' package import (see the module docstring)."""
    if importlib.util.find_spec("mmcv._ext") is None and "mmcv.ops" not in sys.modules:
        ops = types.ModuleType("mmcv.ops")
        ops.__path__ = []
        roi_align = types.ModuleType("mmcv.ops.roi_align")

        def unavailable(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("mmcv's compiled operators are not installed (mmcv-lite)")

        roi_align.roi_align = unavailable
        sys.modules["mmcv.ops"], sys.modules["mmcv.ops.roi_align"] = ops, roi_align
    root = os.path.dirname(importlib.import_module("mmdet").__file__)
    for name in (
        "models",
        "models/task_modules",
        *(f"models/task_modules/{p}" for p in ("assigners", "samplers")),
    ):
        _package_stub("mmdet." + name.replace("/", "."), os.path.join(root, name))
    assign_result = importlib.import_module(f"{_TASK}.assigners.assign_result")
    sys.modules[f"{_TASK}.assigners"].AssignResult = assign_result.AssignResult
    for module in _REGISTERED:
        importlib.import_module(f"{_TASK}.{module}")
    return {
        name: getattr(importlib.import_module(f"{_TASK}.{module}"), name)
        for name, module in _MODULES.items()
    }


def load() -> tuple[MMDet | None, str]:
    """MMDetection's classes, or None and why not."""
    try:
        mmdet = importlib.import_module("mmdet")
        from mmengine.structures import InstanceData
    except ImportError as error:
        return None, f"MMDetection not installed ({error})"
    try:
        task = importlib.import_module(_TASK)
        classes = {name: getattr(task, name) for name in _MODULES}
    except Exception:  # mmcv without its compiled operators fails in many ways
        for name in [n for n in sys.modules if n.startswith("mmdet.models")]:
            del sys.modules[name]
        try:
            classes = _load_modules_alone()
        except Exception as error:
            return None, f"MMDetection's task modules failed to import ({error!r})"
    return MMDet(mmdet.__version__, classes, InstanceData), f"MMDetection {mmdet.__version__}"


def contenders(mm: MMDet, batch: Any, anchors_per_image: list[Tensor]) -> dict[str, Any]:
    """Per-image MMDetection calls on ``batch`` (``samplers.Batch``), by the row they serve."""
    c = mm.classes
    atss = c["ATSSAssigner"](topk=9)
    max_iou = c["MaxIoUAssigner"](
        pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5, match_low_quality=False
    )
    combined = c["CombinedSampler"](
        num=512,
        pos_fraction=0.25,
        add_gt_as_proposals=False,
        pos_sampler={"type": "InstanceBalancedPosSampler"},
        neg_sampler={
            "type": "IoUBalancedNegSampler",
            "floor_thr": -1,
            "floor_fraction": 0,
            "num_bins": 3,
        },
    )
    random = c["RandomSampler"](num=512, pos_fraction=0.25, add_gt_as_proposals=False)
    priors = [mm.priors(p) for p in batch.proposals]
    gts = [mm.gts(g, lab) for g, lab in zip(batch.gt_boxes, batch.gt_labels, strict=True)]
    anchors = [mm.priors(a) for a in anchors_per_image]
    assigned = [max_iou.assign(p, g) for p, g in zip(priors, gts, strict=True)]

    def atss_all() -> None:
        for a, g in zip(anchors, gts, strict=True):
            atss.assign(a, batch.num_per_level, g)

    def max_iou_all() -> None:
        for p, g in zip(priors, gts, strict=True):
            max_iou.assign(p, g)

    def sample_all(sampler: Any) -> None:
        for r, p, g in zip(assigned, priors, gts, strict=True):
            sampler.sample(r, p, g)

    return {
        "atss": atss_all,
        "max_iou": max_iou_all,
        "combined": lambda: sample_all(combined),
        "random": lambda: sample_all(random),
    }
