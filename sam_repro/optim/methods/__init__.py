"""SAM's follow-ups, each written once as a rule over per-device tensor lists (methods/base.py) and
driven by hand through a class with SAM's first_step/second_step usage (docs/methods.md)."""
from sam_repro.optim.methods.base import MethodOptimizer, Needs, Rule
from sam_repro.optim.methods.esam import ESAM
from sam_repro.optim.methods.fsam import FriendlySAM
from sam_repro.optim.methods.gsam import GSAM
from sam_repro.optim.methods.interval import IntervalSAM
from sam_repro.optim.methods.looksam import LookSAM
from sam_repro.optim.methods.registry import METHOD_SPECS, MethodSpec
from sam_repro.optim.methods.rwp import RWP
from sam_repro.optim.methods.samon import ASAMON, SAMON, normalization_parameters
from sam_repro.optim.methods.vasso import VaSSO
from sam_repro.optim.methods.wsam import WSAM

__all__ = ["ASAMON", "ESAM", "GSAM", "METHOD_SPECS", "RWP", "SAMON", "WSAM", "FriendlySAM", "IntervalSAM", "LookSAM",
           "MethodOptimizer", "MethodSpec", "Needs", "Rule", "VaSSO", "normalization_parameters"]
