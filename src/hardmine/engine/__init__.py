"""The harness: ``build`` (a run configuration made real), ``train`` (the training loop),
``evaluate`` (COCO AP and the eval-mode detection loop), ``rundir`` (the run directory's files and
``load_run``), ``roi_loss`` (the loss over all RoIs), ``checkpoint`` and ``distributed`` (DDP
under torchrun). It imports the layers below it, never ``mine`` or ``report``."""
