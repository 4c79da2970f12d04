"""The DS paper's Figures 4-8 from a run: written to TensorBoard and as PNG files when fitting ends."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure
from typing_extensions import override

from lightning_advsel.callbacks.history import EpochHistory
from lightning_advsel.callbacks.min_perturbation import MinimumPerturbation
from lightning_advsel.callbacks.selection_makeup import SelectionMakeup
from lightning_advsel.checks import check_int
from lightning_advsel.step import check_selection_module

ACCURACY_KEYS = ("val/acc_clean", "val/acc_robust", "train/acc")


def _axes(n: int) -> tuple[Figure, Any]:
    """A figure of ``n`` panels, drawn off-screen: ``Figure`` without pyplot leaves the user's backend alone."""
    fig = Figure(figsize=(4.5 * n, 3.5), layout="constrained")
    axes = fig.subplots(1, n)
    return fig, axes


class PaperFigures(EpochHistory, Callback):
    """Draws, at the end of fitting (rank 0), the run's versions of the DS paper's figures.

    * ``figures/p_up``: ``P_up`` per epoch (Fig. 6), as the module used it;
    * ``figures/selection_makeup``: selected clean and adversarial rows per epoch (Fig. 7), from a
      :class:`SelectionMakeup` callback of the same trainer;
    * ``figures/min_perturbation``: the minimum-eps histogram of each measured epoch and the share of minimum
      adversarial examples among the rows DS selects from a training batch's pool (Fig. 8), from a
      :class:`MinimumPerturbation` callback of the same trainer;
    * ``figures/accuracy``: clean and robust validation accuracy per epoch (Figs. 4-5).

    Each figure goes to every TensorBoard logger (``add_figure`` under the tag above) and to
    ``<trainer.log_dir>/figures/<name>.png``. A figure without data (no such callback, no validation) is
    skipped. ``history`` (``P_up`` and accuracies per epoch) is part of the checkpoint state, so a resumed run
    draws all its epochs.

    Args:
        dpi: resolution of the PNG files.
    """

    def __init__(self, dpi: int = 100) -> None:
        self.dpi = check_int("dpi", dpi, 10)
        self.history: list[dict[str, float]] = []
        self.written: list[Path] = []

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_selection_module(pl_module, type(self).__name__)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        row = {"p_up": float(pl_module.p_up)}
        for key in ACCURACY_KEYS:
            if key in trainer.callback_metrics:
                row[key] = float(trainer.callback_metrics[key])
        self.record(trainer.current_epoch, row)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # `trainer.log_dir` broadcasts under DDP, a collective: every rank must ask before rank 0 goes on alone.
        log_dir = trainer.log_dir
        if not trainer.is_global_zero:
            return
        figures = {"p_up": self._p_up(), "selection_makeup": self._makeup(trainer),
                   "min_perturbation": self._min_perturbation(trainer), "accuracy": self._accuracy()}
        out = Path(log_dir or trainer.default_root_dir) / "figures"
        out.mkdir(parents=True, exist_ok=True)
        for name, fig in figures.items():
            if fig is None:
                continue
            path = out / f"{name}.png"
            fig.savefig(path, dpi=self.dpi)
            self.written.append(path)
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_figure(f"figures/{name}", fig, trainer.global_step, close=False)
                    logger.experiment.flush()

    def _p_up(self) -> Figure | None:
        if not self.history:
            return None
        fig, ax = _axes(1)
        ax.plot([h["epoch"] for h in self.history], [h["p_up"] for h in self.history], marker="o")
        ax.set(xlabel="epoch", ylabel="$P_{up}$", ylim=(0, 1.05), title="Selected fraction per epoch (Fig. 6)")
        ax.grid(alpha=0.3)
        return fig

    def _makeup(self, trainer: L.Trainer) -> Figure | None:
        history = next((cb.history for cb in trainer.callbacks if isinstance(cb, SelectionMakeup)), None)
        if not history:
            return None
        epochs = [h["epoch"] for h in history]
        fig, ax = _axes(1)
        ax.plot(epochs, [h["n_clean"] for h in history], marker="o", label="clean")
        ax.plot(epochs, [h["n_adv"] for h in history], marker="s", label="adversarial")
        ax.set(xlabel="epoch", ylabel="selected rows per epoch", title="Selection make-up (Fig. 7)")
        ax.legend()
        ax.grid(alpha=0.3)
        return fig

    def _min_perturbation(self, trainer: L.Trainer) -> Figure | None:
        history = next((cb.history for cb in trainer.callbacks if isinstance(cb, MinimumPerturbation)), None)
        if not history:
            return None
        fig, (ax, ax2) = _axes(2)
        max_eps, num_eps = history[-1]["max_eps"], history[-1].get("num_eps", 20)
        # One bin per grid radius (and one for 0), centred on it: the radii are the only values there are.
        bins = [(i - 0.5) * max_eps / num_eps for i in range(num_eps + 2)]
        cmap = matplotlib.colormaps["viridis"]
        for i, h in enumerate(history):
            color = cmap(i / max(len(history) - 1, 1))
            ax.hist(h["eps"], bins=bins, histtype="step", color=color, label=f"epoch {h['epoch']}")
        on_margin = " on the margin" if history[-1].get("loss") == "margin" else ""  # the search's PGD loss
        ax.set(xlabel="minimum eps (pixels; max = not flipped)", ylabel="probe samples",
               title=f"Minimum perturbation (Fig. 8){on_margin}")
        ax.legend(fontsize="small")
        epochs = [h["epoch"] for h in history]
        share = [h.get("minperturb/selected_min_adv_frac", math.nan) for h in history]
        ax2.plot(epochs, share, marker="o", label="min. adversarial among DS-selected")
        # Half the pool is minimum adversarial examples: the share a random selection would have.
        ax2.axhline(0.5, color="grey", linestyle=":", label="random selection")
        ax2.plot(epochs, [h["minperturb/robust_frac_at_train_eps"] for h in history],
                 marker="s", label="robust at training eps")
        ax2.set(xlabel="epoch", ylabel="share", ylim=(0, 1.05), title="Selected minimum adversarial (Fig. 8)")
        ax2.legend(fontsize="small")
        ax2.grid(alpha=0.3)
        return fig

    def _accuracy(self) -> Figure | None:
        keys = [k for k in ACCURACY_KEYS[:2] if any(k in h for h in self.history)]
        if not keys:
            return None
        fig, ax = _axes(1)
        for key in keys:
            rows = [h for h in self.history if key in h]
            ax.plot([h["epoch"] for h in rows], [h[key] for h in rows], marker="o", label=key)
        ax.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1.02), title="Clean and robust accuracy (Figs. 4-5)")
        ax.legend()
        ax.grid(alpha=0.3)
        return fig
