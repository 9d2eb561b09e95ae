"""Synthetic data: DP synthesizers (mst, dp-copula) and SDV's non-DP baselines behind one
interface. Read ``privacy/synth/base.py`` first: it is the contract."""

from privacy.synth.base import SynthMethod, SynthResult, fit_and_sample, is_dp

__all__ = ["SynthMethod", "SynthResult", "fit_and_sample", "is_dp"]
