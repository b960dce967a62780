"""hardmine.models: torchvision detectors trained with hardmine's samplers and assigners.

``with_sampler`` (Faster / Mask R-CNN) and ``with_assigner`` (RetinaNet, FCOS) wrap a torchvision
detector; ``build`` makes a named one (``DETECTORS``); ``read_only`` scores every RoI without
gradient (OHEM's read-only pass, the loss over all RoIs).
"""

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
