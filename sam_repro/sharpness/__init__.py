"""Sharpness instruments: read trained run directories (config + checkpoint), measure the geometry
of the minimum, write sharpness.json into the run directory; the report reads that file.

Beside report/, downstream of the engine: the engine never imports this package.

- objective: the run's training loss on a fixed subset, as a function of the weights (torch.func)
- hvp: Hessian-vector products of batch losses: reverse (double backward, graphs kept) or forward (jvp of grad)
- hessian: Lanczos top-k eigenvalues, Hutchinson trace, SLQ density (from Hessian-vector products)
- msharpness: the SAM paper's m-sharpness (Sec. 4.1), one-step or n-step ascent, vmapped over chunks
- landscape: filter-normalized 1D/2D slices (Li et al. 2018), linear interpolation between runs
- rundir: run directory -> model with its weights + the run's data; cli: `sam-sharpness`
"""
from .hessian import Density, Lanczos, Trace, TopEigen, hutchinson_trace, lanczos, slq_density, top_eigenvalues
from .hvp import DEFAULT_HVP, HVP_MODES, ForwardHVP, ReverseHVP, make_hvp
from .landscape import filter_normalized_direction, interpolate, slice_1d, slice_2d
from .msharpness import MSharpness, m_sharpness, m_sharpness_grid
from .objective import BN_MODES, DTYPES, AffineBatchNorm, HessianOperator, Objective, prepare_model
from .rundir import SHARPNESS_FILE, Run, RunDirError, load_run, train_subset

__all__ = [
    "Density", "Lanczos", "Trace", "TopEigen", "hutchinson_trace", "lanczos", "slq_density", "top_eigenvalues",
    "DEFAULT_HVP", "HVP_MODES", "ForwardHVP", "ReverseHVP", "make_hvp", "AffineBatchNorm", "HessianOperator",
    "filter_normalized_direction", "interpolate", "slice_1d", "slice_2d", "MSharpness", "m_sharpness",
    "m_sharpness_grid", "BN_MODES", "DTYPES", "Objective", "prepare_model", "SHARPNESS_FILE", "Run",
    "RunDirError", "load_run", "train_subset",
]
