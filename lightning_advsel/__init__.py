"""Adversarial training with data selection, as a PyTorch Lightning module and callbacks."""

from importlib.metadata import PackageNotFoundError, version

# As Lightning's packages do: `lightning_advsel.callbacks.X` after `import lightning_advsel` alone. The callbacks
# import this package's submodules only, never a name from this file, so the order of these lines holds no cycle.
from lightning_advsel import callbacks as callbacks  # a re-export, kept out of __all__ (documented on its own page)
from lightning_advsel.attacks import AttackConfig, fgsm, fgsm_rs, pgd
from lightning_advsel.evaluation import AutoAttackConfig
from lightning_advsel.models import Normalize
from lightning_advsel.module import AdversarialSelectionModule
from lightning_advsel.step import RECIPES, SelectionModule, SelectionRecord, StepResult, StepSettings, adversarial_step

__all__ = ["RECIPES", "AdversarialSelectionModule", "AttackConfig", "AutoAttackConfig", "Normalize", "SelectionModule",
           "SelectionRecord", "StepResult", "StepSettings", "adversarial_step", "fgsm", "fgsm_rs", "pgd"]
try:
    __version__ = version("lightning-advsel")  # pyproject.toml's version, as installed
except PackageNotFoundError:  # a bare checkout on sys.path, never installed
    __version__ = "0+unknown"
