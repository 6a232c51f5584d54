"""Training: the Accelerate loop (``loop``), exact-resume checkpoints (``checkpoint``) and the losses (``losses``)."""
