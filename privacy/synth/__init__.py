"""Synthetic data: DP synthesizers (mst, dp-copula) and SDV's non-DP baselines behind one
interface. Read ``privacy/synth/base.py`` first: it is the contract. The modules import in one
direction only: ``base`` -> ``registry`` -> (lazily) the engines -> ``codec``."""

from privacy.synth.base import fit_and_sample
from privacy.synth.codec import SynthMethod, SynthResult
from privacy.synth.registry import is_dp

__all__ = ["SynthMethod", "SynthResult", "fit_and_sample", "is_dp"]
