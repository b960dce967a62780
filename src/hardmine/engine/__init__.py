"""The harness: ``train`` (training runs), ``evaluate`` (COCO AP), ``checkpoint`` (atomic files),
``distributed`` (DDP under torchrun)."""
