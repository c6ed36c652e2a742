"""Optimizers: the fused SAM step and the factory that builds SGD/SAM/ASAM from a config."""
from sam_repro.optim.sam import SAM

__all__ = ["SAM"]
