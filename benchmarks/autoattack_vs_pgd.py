"""Clean, PGD-20 and AutoAttack robust accuracy of one trained model, as a table.

Trains the model through the public CLI (default: the main job, ``configs/digits/base.yaml`` +
``recipes/ds.yaml`` + ``callbacks/dashboards.yaml``), or loads a
checkpoint the CLI wrote, then tests it on the data module's test split (the first ``--images`` of it) under
each attack through ``trainer.test``, the same path as ``lightning-advsel test``:

* PGD-20: the config's validation attack (``eval_attack``);
* AutoAttack ``apgd``: APGD-CE + APGD-T with the standard version's settings;
* AutoAttack ``standard``: APGD-CE, APGD-T, FAB-T, Square (5000 queries on the rows still robust: the slow
  part; skip it with ``--no-standard``).

AutoAttack is the reference code (pyautoattack, 100 iterations per attack), or torchattacks' port (10) with
``--implementation torchattacks``.

Needs the eval extra (``pip install -e ".[eval]"``). Wall times are of this process on this machine; run it
on an idle one.

    python benchmarks/autoattack_vs_pgd.py                               # train the main job, test 270 digits
    python benchmarks/autoattack_vs_pgd.py --images 64
    python benchmarks/autoattack_vs_pgd.py --ckpt lightning_logs/digits_ds/version_0/checkpoints/last.ckpt

Other arguments go to the CLI (``--trainer.max_epochs 1`` for a quick look).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, Subset

from lightning_advsel import AdversarialSelectionModule, AutoAttackConfig
from lightning_advsel.cli import build_cli

REPO = Path(__file__).resolve().parents[1]
MAIN_JOB = ("digits/base.yaml", "recipes/ds.yaml", "callbacks/dashboards.yaml")  # under configs/


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "-c", action="append",
                        help="CLI config to train, repeatable, combined in order (and whose data module gives the "
                             "test split); default: the main job's")
    parser.add_argument("--ckpt", default=None, help="test this CLI checkpoint instead of training")
    parser.add_argument("--images", type=int, default=None, help="first test images to use (default: all)")
    parser.add_argument("--batch_size", type=int, default=64, help="test images per batch")
    parser.add_argument("--seed", type=int, default=0, help="AutoAttack seed")
    parser.add_argument("--no-standard", action="store_true", help="skip the full (slow) AutoAttack")
    parser.add_argument("--implementation", choices=("reference", "torchattacks"), default="reference",
                        help="AutoAttack's code (default: reference)")
    args, cli_args = parser.parse_known_args()  # anything else goes to the CLI, e.g. --trainer.max_epochs 1
    args.config = args.config or [str(REPO / "configs" / name) for name in MAIN_JOB]
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")

    with tempfile.TemporaryDirectory() as logs:
        started = time.perf_counter()
        train = args.ckpt is None
        cli = build_cli([*(["fit"] if train else []), *[a for c in args.config for a in ("--config", c)],
                         "--trainer.enable_progress_bar",
                         "false", "--trainer.logger.init_args.save_dir", logs, *cli_args], run=train)
        trained_s = time.perf_counter() - started
        module = cli.model
        if args.ckpt is not None:
            module = AdversarialSelectionModule.load_from_checkpoint(args.ckpt)
            trained_s = 0.0
    datamodule = cli.datamodule
    datamodule.setup("test")
    test_set = datamodule.test_set
    n = len(test_set) if args.images is None else min(args.images, len(test_set))
    loader = DataLoader(Subset(test_set, range(n)), batch_size=args.batch_size)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)

    if module.eval_attack is None:
        raise SystemExit("the model has no `eval_attack`: its eps and norm are the threat model tested here")
    eps = module.eval_attack.eps
    norm = module.eval_attack.norm
    chosen = {"eps": eps, "norm": norm, "seed": args.seed, "implementation": args.implementation}
    attacks = [("PGD-20 (eval_attack)", module.eval_attack),
               ("AutoAttack apgd", AutoAttackConfig(version="apgd", **chosen))]
    if not args.no_standard:
        attacks.append(("AutoAttack standard", AutoAttackConfig(**chosen)))
    rows = []
    for name, attack in attacks:
        module.test_attack = attack
        started = time.perf_counter()
        (metrics,) = trainer.test(module, loader, verbose=False)
        rows.append((name, attack.describe(), metrics["test/acc_clean"], metrics["test/acc_robust"],
                     time.perf_counter() - started))

    source = args.ckpt or f"{' + '.join(Path(c).name for c in args.config)}, trained in {trained_s:.0f} s"
    print(f"\n{n} test images of {type(datamodule).__name__}; model: {source}\n")
    print("| attack | settings | clean | robust | wall |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, settings, clean, robust, wall in rows:
        print(f"| {name} | {settings} | {clean:.4f} | {robust:.4f} | {wall:.1f} s |")


if __name__ == "__main__":
    main()
