"""sam-repro: reproduce Sharpness-Aware Minimization (Foret et al., ICLR 2021) and run SAM vs SGD."""

__version__ = "0.1.0"
