"""Callbacks that adapt, count, probe and plot a run: the DS paper's Figures 4-8 as Lightning callbacks."""

from lightning_advsel.callbacks.adaptive_p_up import AdaptivePUp
from lightning_advsel.callbacks.figures import PaperFigures
from lightning_advsel.callbacks.min_perturbation import (
    MinimumAdversarialPool,
    MinimumPerturbation,
    minimum_adversarial_pool,
    minimum_eps,
)
from lightning_advsel.callbacks.predictions import PredictionWriter
from lightning_advsel.callbacks.schedules import next_p_up, p_up_sequence
from lightning_advsel.callbacks.selection_makeup import SelectionCounts, SelectionMakeup
from lightning_advsel.callbacks.stability_profile import StabilityCost, StabilityProfile

__all__ = ["AdaptivePUp", "MinimumAdversarialPool", "MinimumPerturbation", "PaperFigures", "PredictionWriter",
           "SelectionCounts", "SelectionMakeup", "StabilityCost", "StabilityProfile", "minimum_adversarial_pool",
           "minimum_eps", "next_p_up", "p_up_sequence"]
