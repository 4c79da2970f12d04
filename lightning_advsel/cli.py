"""``lightning-advsel``: LightningCLI with ``fit``, ``validate``, ``test`` and ``predict`` over composed YAML configs.

A run combines a data set's base config with a recipe overlay and, optionally, callback or trainer overlays;
later files override earlier ones::

    lightning-advsel fit --config configs/digits/base.yaml --config configs/recipes/ds.yaml
    lightning-advsel validate --config configs/digits/base.yaml --config configs/recipes/ds.yaml --ckpt_path last

``predict`` writes the test set's predictions to ``predictions.csv`` in the run's folder
(:class:`~lightning_advsel.callbacks.PredictionWriter`).

``lightning-advsel export --ckpt_path ... --out ...`` (with the run's configs) writes the trained classifier to a
file that loads without this package (:func:`export_checkpoint`); ``lightning-advsel evaluate --ckpt_path ...
--out report.json`` writes its AutoAttack accuracy on the test set, resuming after a kill
(:func:`evaluate_checkpoint`).

The TensorBoard run is named after what was combined (:func:`run_name`: ``digits/ds`` above), unless a
config or the command line names it (``--trainer.logger.init_args.name``). The configs ship inside the package:
``--config digits/base`` names the same file, from any folder (see :mod:`lightning_advsel.shipped_configs`), and
``lightning-advsel configs`` lists them.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from lightning_advsel import shipped_configs
from lightning_advsel.batch import unpack
from lightning_advsel.callbacks.predictions import PredictionWriter
from lightning_advsel.checks import check_checkpoint_file
from lightning_advsel.evaluate_checkpoint import evaluate_autoattack
from lightning_advsel.evaluation import AutoAttackConfig
from lightning_advsel.export import FORMATS, export_model
from lightning_advsel.module import AdversarialSelectionModule

BASE_CONFIG = "base.yaml"  # configs/<data set>/base.yaml: the data set's data, model, attacks and trainer
ADD_ON_FOLDERS = ("callbacks", "trainer")  # overlays that watch or place a run, not change what it trains
DATA_SET_FIELD = "{data_set}"  # in a config's strings: the folder of the base config, e.g. "mnist"
LOG_DIR = "lightning_logs"  # TensorBoard's folder, relative to the working directory
EXPORT_HELP = "Write a checkpoint's classifier to a file that loads without lightning_advsel."
EVALUATE_HELP = "A checkpoint's clean and AutoAttack accuracy on the test set, as a JSON report; a rerun resumes."
ASKED_ATTACKS = ("test_attack", "predict_attack")  # set for one evaluation: the configs' win over a checkpoint's


def option_values(args: list[str], *names: str) -> list[str]:
    """The values given to the options ``names`` in ``args`` (``--name value`` or ``--name=value``), in order."""
    values = []
    for i, arg in enumerate(args):
        if arg in names and i + 1 < len(args):
            values.append(args[i + 1])
        elif arg.startswith("--") and "=" in arg and arg.split("=", 1)[0] in names:
            values.append(arg.split("=", 1)[1])
    return values


def config_files(args: list[str]) -> list[Path]:
    """The files given with ``--config``/``-c`` in ``args``, in order."""
    return [Path(value) for value in option_values(args, "--config", "-c")]


def _label(path: Path) -> str | None:
    path = path.resolve()
    if path.name == BASE_CONFIG:
        return path.parent.name
    return None if path.parent.name in ADD_ON_FOLDERS else path.stem


def run_name(files: list[Path]) -> str | None:
    """The TensorBoard run name of a combination of config files: their labels joined by ``/``.

    A ``base.yaml`` is labelled by its folder (the data set), a file in a ``callbacks/`` or ``trainer/`` folder
    has no label, and any other file is labelled by its stem: ``configs/mnist/base.yaml`` +
    ``configs/recipes/ds.yaml`` + ``configs/callbacks/dashboards.yaml`` gives ``mnist/ds``. ``None`` without
    a labelled file.
    """
    return "/".join(label for label in map(_label, files) if label) or None


def data_set(files: list[Path]) -> str | None:
    """The data set of a combination of config files: the folder of its (last) ``base.yaml``, else ``None``."""
    bases = [f.resolve().parent.name for f in files if f.name == BASE_CONFIG]
    return bases[-1] if bases else None


def _fill(value: Any, data_set_name: str | None) -> Any:
    """``value`` with ``{data_set}`` replaced in every string it holds (namespaces, lists and dicts walked)."""
    if isinstance(value, str) and DATA_SET_FIELD in value:
        if data_set_name is None:
            raise ValueError(f"{value!r} names {DATA_SET_FIELD}, the folder of the base config, but no "
                             f"--config file is a {BASE_CONFIG} (e.g. configs/digits/{BASE_CONFIG})")
        return value.replace(DATA_SET_FIELD, data_set_name)
    if isinstance(value, Namespace):
        for key, item in vars(value).items():
            setattr(value, key, _fill(item, data_set_name))
    elif isinstance(value, list):
        value[:] = [_fill(item, data_set_name) for item in value]
    elif isinstance(value, dict):
        value.update({key: _fill(item, data_set_name) for key, item in value.items()})
    return value


# Lightning documents an int as a count of batches and a float as a fraction, and annotates these arguments
# Optional[Union[int, float]]; but typing caches unions by their members, so the one Python hands the Trainer can be
# a float-first Union[float, int, None] built elsewhere (Lightning issue #21259), and the CLI then reads
# `limit_val_batches: 1` as 1.0, all batches. An int-first union that the cache cannot reorder restores the meaning.
_COUNT_OR_FRACTION = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")


def _batch_counts_parse_as_ints() -> None:
    annotations = Trainer.__init__.__annotations__
    for name in _COUNT_OR_FRACTION:
        if name in annotations:
            annotations[name] = int | float | None


class AdvSelCLI(LightningCLI):
    """LightningCLI for composed configs that prints clean and robust validation accuracy and the training cost
    (against robust training's) when ``fit`` ends.

    From the ``--config`` files given it takes the default TensorBoard logger (``lightning_logs/<run name>``,
    see :func:`run_name`; a name or logger given in a config or on the command line wins) and fills
    ``{data_set}`` in the config's strings (see :func:`data_set`), so that one recipe overlay serves every data
    set: the stability baseline's profile path.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        given = kwargs.get("args")
        given = sys.argv[1:] if given is None else given
        # Command-line words only; a dict or namespace of arguments names no config files.
        words = [str(a) for a in given] if isinstance(given, list) else []
        resolved = shipped_configs.resolve_args(words)
        # The command line, with its config names resolved, is passed on as `args`: not a second set of arguments.
        self._resolved_command_line = kwargs.get("args") is None and resolved != words
        if resolved != words:  # a config named, not given by path: parse the files it names
            kwargs["args"] = words = resolved
        self._config_files = config_files(words)
        # Before anything is parsed: LightningCLI reads a checkpoint's hyperparameters while parsing.
        for path in option_values(words, "--ckpt_path"):
            check_checkpoint_file(path)
        _batch_counts_parse_as_ints()
        super().__init__(*args, **kwargs)

    def init_parser(self, **kwargs: Any) -> Any:  # noqa: ANN401 - a LightningArgumentParser
        parser = super().init_parser(**kwargs)
        parser.epilog = shipped_configs.help_text()
        return parser

    def add_arguments_to_parser(self, parser: Any) -> None:  # noqa: ANN401 - a LightningArgumentParser
        name = run_name(self._config_files)
        if name is not None:
            # No placeholder `hp_metric` session: the module writes the run's own (lightning_advsel.dashboard).
            logger = {"save_dir": LOG_DIR, "name": name, "default_hp_metric": False}
            parser.set_defaults({"trainer.logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                                    "init_args": logger}})

    def parse_arguments(self, parser: Any, args: Any) -> None:  # noqa: ANN401 - LightningCLI's types
        with warnings.catch_warnings():
            if self._resolved_command_line:
                warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            super().parse_arguments(parser, args)
        # LightningCLI next replaces the model's arguments by a checkpoint's hyperparameters (`--ckpt_path`); the
        # attacks that a `test` or `predict` is asked to run stay as the configs and the command line give them.
        sub = self.config.get("subcommand")
        given = {key: self.config.get(f"{sub}.model.init_args.{key}") for key in ASKED_ATTACKS} if sub else {}
        self._asked_attacks = {key: value for key, value in given.items() if value is not None}

    def before_instantiate_classes(self) -> None:
        for key, value in self._asked_attacks.items():
            self.config[f"{self.subcommand}.model.init_args.{key}"] = value
        _fill(self.config[self.subcommand] if self.subcommand else self.config, data_set(self._config_files))

    def before_predict(self) -> None:
        # A prediction the command line returns is lost: write it to the run's folder, unless a config brings a writer.
        if not any(isinstance(cb, BasePredictionWriter) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(PredictionWriter())

    def after_fit(self) -> None:
        self._print_summary("val")

    def after_validate(self) -> None:
        self._print_summary("val")

    def after_test(self) -> None:
        self._print_summary("test")

    @rank_zero_only
    def _print_summary(self, stage: str) -> None:
        metrics = self.trainer.callback_metrics
        attack = self.model.robust_attack(stage)
        # One line per loader: several validation or test loaders log with Lightning's "/dataloader_idx_N" suffix.
        for suffix in [""] + sorted(key.removeprefix(f"{stage}/acc_clean") for key in metrics
                                    if key.startswith(f"{stage}/acc_clean/dataloader_idx_")):
            clean = metrics.get(f"{stage}/acc_clean{suffix}")
            if clean is None:
                continue
            robust = metrics.get(f"{stage}/acc_robust{suffix}")
            line = f"{stage}{suffix.replace('/dataloader_idx_', ' loader ')} accuracy: clean {float(clean):.4f}"
            if robust is not None and attack is not None:
                line += f", robust {float(robust):.4f} ({attack.describe()})"
            print(line, flush=True)
        work = self.model.cost_summary() if stage == "val" and self.subcommand == "fit" else None
        if work is not None:
            print(f"training cost: {work}", flush=True)


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


def _checkpoint_command(parser: argparse.ArgumentParser, args: list[str]) -> tuple[argparse.Namespace, AdvSelCLI,
                                                                                    AdversarialSelectionModule]:
    """``parser``'s options in ``args``, the CLI built from the other arguments (the run's configs and
    overrides, parsed without running anything) and the module of ``--ckpt_path`` with the configs' network."""
    known, rest = parser.parse_known_args(args)
    with warnings.catch_warnings():
        # The words are the command line's, less this command's options: not a second set of arguments.
        warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
        cli = build_cli([*rest, "--trainer.logger", "false"], run=False)
    module = type(cli.model).load_from_checkpoint(known.ckpt_path, model=cli.model.model, map_location="cpu")
    return known, cli, module


def export_checkpoint(args: list[str]) -> Path:
    """``lightning-advsel export``: write a checkpoint's classifier to a file that loads without this package.

    ``--ckpt_path`` (the checkpoint), ``--out`` (the file) and ``--format`` (``state_dict``, the default, or
    ``torch_export``, see :mod:`lightning_advsel.export`); the other arguments are the run's configs and overrides,
    as for ``predict``. They build the model the weights go into and, for ``torch_export``, the data module whose
    first prediction batch is the example input.

    Raises:
        ValueError: for a damaged checkpoint (naming it), one of another architecture, or a model that the format
            cannot capture.
    """
    parser = argparse.ArgumentParser(prog="lightning-advsel export", description=EXPORT_HELP,
                                     epilog="Other arguments: the run's --config files and overrides, as for predict.")
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by fit")
    parser.add_argument("--out", required=True, help="file to write")
    parser.add_argument("--format", choices=FORMATS, default="state_dict", help="default: state_dict")
    known, cli, module = _checkpoint_command(parser, args)
    example = None
    if known.format == "torch_export":
        cli.datamodule.setup("predict")
        example, _, _ = unpack(next(iter(cli.datamodule.predict_dataloader())))
    path = export_model(module, known.out, known.format, example)
    print(f"exported {type(module.model).__name__} ({known.format}) to {path}", flush=True)
    return path


def evaluate_checkpoint(args: list[str]) -> dict:
    """``lightning-advsel evaluate``: a checkpoint's clean and AutoAttack accuracy on the data module's test set,
    written to a JSON report; a rerun after a kill resumes from the finished batches
    (:func:`~lightning_advsel.evaluate_checkpoint.evaluate_autoattack`).

    ``--ckpt_path`` (the checkpoint) and ``--out`` (the report); the other arguments are the run's configs and
    overrides, as for ``test``. The attack is the configs' ``test_attack`` (``--model.init_args.test_attack
    AutoAttackConfig --model.init_args.test_attack.eps ...``), else the checkpoint's; it must be an
    ``AutoAttackConfig``. ``--trainer.limit_test_batches`` limits the batches, ``--trainer.accelerator`` picks
    the device and ``--trainer.enable_progress_bar false`` hides the progress bar.

    Raises:
        ValueError: before any attack, for a missing or damaged checkpoint, a test attack that is not
            AutoAttack, or a report or partial results at ``--out`` of other settings.
    """
    parser = argparse.ArgumentParser(prog="lightning-advsel evaluate", description=EVALUATE_HELP,
                                     epilog="Other arguments: the run's --config files and overrides, as for test.")
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by fit")
    parser.add_argument("--out", required=True, help="JSON report to write; OUT.partial holds the finished "
                        "batches until then, and a rerun resumes from it")
    known, _ = parser.parse_known_args(args)
    if not Path(known.ckpt_path).is_file():
        raise ValueError(f"`--ckpt_path` must be a checkpoint file, got {known.ckpt_path!r}")
    known, cli, module = _checkpoint_command(parser, args)
    attack = cli.model.test_attack if cli.model.test_attack is not None else module.test_attack
    if not isinstance(attack, AutoAttackConfig):
        raise ValueError(f"`test_attack` must be an AutoAttackConfig for evaluate, got {attack!r}; add "
                         f"--model.init_args.test_attack AutoAttackConfig --model.init_args.test_attack.eps EPS")
    device = cli.trainer.strategy.root_device
    module.to(device)
    cli.datamodule.setup("test")
    loader = cli.datamodule.test_dataloader()
    limit = cli.trainer.limit_test_batches
    total = len(loader) if limit is None else min(len(loader), limit if isinstance(limit, int)
                                                  else int(len(loader) * limit))

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        for batch in loader:
            x, y, _ = module.read_batch(batch)
            yield x.to(device), y.to(device).long()

    return evaluate_autoattack(module.pixel_model, batches(), attack, known.out, num_classes=module.num_classes,
                               total_batches=total, checkpoint=known.ckpt_path,
                               progress=cli.trainer.progress_bar_callback is not None)


def main(args: list[str] | None = None) -> None:
    """Entry point of ``lightning-advsel``; ``args`` replaces ``sys.argv[1:]`` when given (for calls from Python).

    ``lightning-advsel configs [NAME]`` lists the shipped configs, or prints one (to copy and edit);
    ``lightning-advsel export ...`` writes a trained classifier to a file (:func:`export_checkpoint`);
    ``lightning-advsel evaluate ...`` writes a checkpoint's AutoAttack report, resumably (:func:`evaluate_checkpoint`).
    """
    words = sys.argv[1:] if args is None else args
    if words[:1] == ["configs"]:
        print(shipped_configs.show(words[1:]), end="")
        return
    if words[:1] == ["export"]:
        export_checkpoint(words[1:])
        return
    if words[:1] == ["evaluate"]:
        evaluate_checkpoint(words[1:])
        return
    build_cli(args)


if __name__ == "__main__":
    main()
