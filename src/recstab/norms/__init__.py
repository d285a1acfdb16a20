"""Stability constraints (SN, SRN, SRN-C as torch parametrizations), exact conv spectra and a proven bound."""

from .apply import (NORM_KINDS, NORMS, SN, SRN, SRNC, NoNorm, WeightNorm, apply_norm, bake, make_norm,
                    normalised_convs, refresh, remove_norm)
from .bound import conv_norm_bound, conv_norm_bounds
from .sn import PowerIterationNorm, SpectralNorm
from .spectra import conv_singular_values, spectral_norm_fft, spectral_norm_power, stable_rank
from .srn import StableRankNorm
from .srnc import ConvStableRankNorm

__all__ = [
    "WeightNorm", "NoNorm", "SN", "SRN", "SRNC", "NORMS", "NORM_KINDS", "make_norm", "apply_norm", "bake", "refresh", "remove_norm", "normalised_convs",
    "conv_norm_bound", "conv_norm_bounds", "conv_singular_values", "stable_rank", "spectral_norm_fft", "spectral_norm_power",
    "PowerIterationNorm", "SpectralNorm", "StableRankNorm", "ConvStableRankNorm",
]
