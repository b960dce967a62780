"""hardmine.models: torchvision detectors trained with hardmine's samplers and assigners."""

from hardmine.models.build import DETECTORS, build
from hardmine.models.fcos import AssignedFCOS
from hardmine.models.retinanet import AssignedRetinaNet, with_assigner
from hardmine.models.roi_heads import SamplingRoIHeads, with_sampler
from hardmine.models.rpn import SamplingRPN

__all__ = [
    "DETECTORS",
    "AssignedFCOS",
    "AssignedRetinaNet",
    "SamplingRPN",
    "SamplingRoIHeads",
    "build",
    "with_assigner",
    "with_sampler",
]
