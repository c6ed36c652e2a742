"""The SAM-family methods by name: each one's Python class, its rule, what its step needs, its source.

A driver (the engine's step, the optimizer factory, the config's `optim.name`) looks a method up here
and dispatches on `spec.needs` (the passes and extra forwards it asks for), never on the name.
"""
from __future__ import annotations

from dataclasses import dataclass

from sam_repro.optim.methods.base import MethodOptimizer, Needs, Rule
from sam_repro.optim.methods.esam import ESAM, ESAMRule
from sam_repro.optim.methods.fsam import FriendlySAM, FriendlySAMRule
from sam_repro.optim.methods.gsam import GSAM, GSAMRule
from sam_repro.optim.methods.interval import IntervalSAM, IntervalSAMRule
from sam_repro.optim.methods.looksam import LookSAM, LookSAMRule
from sam_repro.optim.methods.rwp import RWP, RWPRule
from sam_repro.optim.methods.samon import ASAMON, SAMON, SAMONRule
from sam_repro.optim.methods.vasso import VaSSO, VaSSORule
from sam_repro.optim.methods.wsam import WSAM, WSAMRule


@dataclass(frozen=True)
class MethodSpec:
    """One method: its hand-driven class, its rule, and where its reference code lives."""

    name: str
    optimizer: type[MethodOptimizer]
    rule: type[Rule]
    source: str  # repository @ commit, file: what the rule reproduces (docs/methods.md has the details)
    paper: str

    @property
    def needs(self) -> Needs:
        return self.rule.needs


METHOD_SPECS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("gsam", GSAM, GSAMRule, "juntang-zhuang/GSAM @ a770275, gsam/gsam.py",
               "Zhuang et al., Surrogate Gap Minimization Improves Sharpness-Aware Training, ICLR 2022"),
    MethodSpec("esam", ESAM, ESAMRule, "dydjw9/Efficient_SAM @ 1e06840, utils/Esam.py",
               "Du et al., Efficient Sharpness-aware Minimization for Improved Training of Neural Networks, ICLR 2022"),
    MethodSpec("fsam", FriendlySAM, FriendlySAMRule, "nblt/F-SAM @ 2e2f989, utils.py",
               "Li et al., Friendly Sharpness-Aware Minimization, CVPR 2024"),
    MethodSpec("vasso", VaSSO, VaSSORule, "BingcongLi/VaSSO @ 3524bad, solver/vasso.py",
               "Li and Giannakis, Enhancing Sharpness-Aware Optimization Through Variance Suppression, NeurIPS 2023"),
    MethodSpec("samon", SAMON, SAMONRule, "mueller-mp/SAM-ON @ 8b8869a, sam_on.py (SAM_ON)",
               "Mueller et al., Normalization Layers Are All That Sharpness-Aware Minimization Needs, NeurIPS 2023"),
    MethodSpec("asam_on", ASAMON, SAMONRule, "mueller-mp/SAM-ON @ 8b8869a, sam_on.py (ASAM_ON)",
               "Mueller et al., Normalization Layers Are All That Sharpness-Aware Minimization Needs, NeurIPS 2023"),
    MethodSpec("interval_sam", IntervalSAM, IntervalSAMRule, "mosaicml/composer @ 6405188, composer/algorithms/sam/sam.py",
               "Foret et al., Sharpness-Aware Minimization, ICLR 2021 (Composer's interval)"),
    MethodSpec("looksam", LookSAM, LookSAMRule, "no official code: the paper's Algorithm 1",
               "Liu et al., Towards Efficient and Scalable Sharpness-Aware Minimization, CVPR 2022"),
    MethodSpec("rwp", RWP, RWPRule, "nblt/RWP @ cb0acb0, train_rwp_parallel.py (train)",
               "Li et al., Efficient Generalization Improvement Guided by Random Weight Perturbation, 2022"),
    MethodSpec("wsam", WSAM, WSAMRule, "intelligent-machine-learning/dlrover @ 4584843 (atorch-v0.1.5), "
               "atorch/atorch/optimizers/wsam.py",
               "Yue et al., Sharpness-Aware Minimization Revisited: Weighted Sharpness as a Regularization Term, KDD 2023"),
)}
