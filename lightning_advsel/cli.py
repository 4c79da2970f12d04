"""``lightning-advsel``: LightningCLI with ``fit``, ``validate`` and ``test`` over YAML configs.

Example::

    lightning-advsel fit --config configs/digits_ds.yaml
    lightning-advsel validate --config configs/digits_ds.yaml --ckpt_path last
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from lightning_advsel.module import AdversarialSelectionModule


class AdvSelCLI(LightningCLI):
    """LightningCLI that prints clean and robust validation accuracy when ``fit`` ends."""

    def after_fit(self) -> None:
        self._print_summary("val")

    def after_validate(self) -> None:
        self._print_summary("val")

    def after_test(self) -> None:
        self._print_summary("test")

    @rank_zero_only
    def _print_summary(self, stage: str) -> None:
        metrics = self.trainer.callback_metrics
        clean = metrics.get(f"{stage}/acc_clean")
        robust = metrics.get(f"{stage}/acc_robust")
        if clean is None:
            return
        attack = self.model.robust_attack(stage)
        line = f"{stage} accuracy: clean {float(clean):.4f}"
        if robust is not None and attack is not None:
            line += f", robust {float(robust):.4f} ({attack.describe()})"
        print(line, flush=True)


def build_cli(args: list[str] | None = None, run: bool = True) -> AdvSelCLI:
    """Parse ``args`` (``sys.argv[1:]`` if ``None``), run the subcommand, and return the CLI object.

    With ``run=False`` there is no subcommand: ``args`` is only parsed and the trainer, model and data module
    are instantiated (``cli.trainer``, ``cli.model``, ``cli.datamodule``) without touching any data.
    """
    return AdvSelCLI(
        AdversarialSelectionModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of ``lightning-advsel``; ``args`` replaces ``sys.argv[1:]`` when given (for calls from Python)."""
    build_cli(args)


if __name__ == "__main__":
    main()
