"""Does a model's robustness hang on the BatchNorm statistics it was trained with? Recompute them, attack again.

DS at P_up 0.5 (``selection_forward: separate``) forwards only the selected rows with gradients, so BatchNorm
normalizes each training step by the statistics of the highest-loss half of the clean + adversarial pool, and
its running statistics, the ones a test sees, follow those rows. Random selection forwards a random half, whose
statistics are those of the pool. This script asks how much of a checkpoint's test accuracy depends on that: it
recomputes every BatchNorm layer's running statistics (a cumulative average, ``momentum=None``) from the same
training batches in four ways and attacks the test images with each:

* ``as trained``: the checkpoint's own running statistics;
* ``clean``: the clean training images;
* ``pool``: the DS pool of each batch, clean images plus the training attack's examples (made on the checkpoint,
  in the training attack's mode);
* ``selected``: the top ``--p-up`` of each pool by cross-entropy, scored in train mode as DS scores it, one
  forward per selected set: what DS's own training steps normalized by.

Only running statistics change; the weights are the checkpoint's. Per variant the table gives clean accuracy,
PGD-20 on the cross-entropy (the records' attack) and on the logit margin, AutoAttack (``apgd``: APGD-CE and
APGD-T, the records' ``aa_apgd``, seeded per batch of 100 as the test step seeds it, so the ``as trained`` row
repeats the record) unless ``--no-autoattack``, and the statistics' distance from the clean ones: the mean over
layers and channels of ``|mean - clean mean| / clean std``, and of ``|log(var / clean var)|``. The line above
each table gives the share of adversarial rows among the selected ones (DS logs it as ``train/selected_adv_frac``).

Training batches come from the run's data module in its order, augmented as its first epoch augments them (the
checkpoint's run folder holds the ``config.yaml``, as for ``gradient_masking.py``).

    python benchmarks/batchnorm_statistics.py benchmarks/runs/cifar10_bn/ds/seed0/checkpoints/best-*.ckpt \\
        benchmarks/runs/cifar10_bn/random/seed0/checkpoints/best-*.ckpt --batches 20 --images 500

Needs the eval extra (``pip install -e ".[eval]"``) for AutoAttack. Runs on CPU in float32.
"""

from __future__ import annotations

import argparse
import copy
import warnings
from pathlib import Path

import torch
from gradient_masking import correct, in_batches, load_module, run_cli, test_images
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_advsel.attacks import AttackConfig, margin_loss, model_mode, pgd
from lightning_advsel.evaluation import AutoAttackConfig
from lightning_advsel.selection import per_sample_loss

AA_BATCH = 100  # test images per AutoAttack call: the records' test batch, whose index seeds the attack


def batch_norms(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def training_batches(config: Path, batches: int) -> list[tuple[Tensor, Tensor]]:
    """The run's first ``batches`` training batches (pixels in [0, 1], labels), augmented as in epoch 0."""
    cli = run_cli(config)
    datamodule = cli.datamodule
    datamodule.setup("fit")
    out = []
    for i, batch in enumerate(datamodule.train_dataloader()):
        if i == batches:
            break
        if hasattr(datamodule, "training_batch"):  # uint8 images (CIFAR-10, image folders), augmented after transfer
            batch = datamodule.training_batch(batch, epoch=0, position=i)
        x, y, _ = cli.model.read_batch(batch)
        out.append((x, y))
    if len(out) < batches:
        raise SystemExit(f"--batches {batches}: the training loader of {config} has only {len(out)}")
    return out


def recalibrated(model: nn.Module, inputs: list[Tensor]) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are the cumulative average over ``inputs``."""
    model = copy.deepcopy(model)
    for m in batch_norms(model):
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every batch weighs the same
    model.train()
    with torch.no_grad():
        for x in inputs:
            model(x)
    return model.eval()


def distance(model: nn.Module, reference: nn.Module) -> tuple[float, float]:
    """Mean over layers and channels of ``|mean - ref mean| / ref std`` and ``|log(var / ref var)|``."""
    shifts, ratios = [], []
    for m, r in zip(batch_norms(model), batch_norms(reference), strict=True):
        std = (r.running_var + r.eps).sqrt()
        shifts.append(((m.running_mean - r.running_mean).abs() / std).mean())
        ratios.append(((m.running_var + m.eps) / (r.running_var + r.eps)).log().abs().mean())
    return float(torch.stack(shifts).mean()), float(torch.stack(ratios).mean())


def pools(model: nn.Module, train_attack: AttackConfig, batches: list[tuple[Tensor, Tensor]], p_up: float,
          seed: int) -> tuple[list[Tensor], list[Tensor], float]:
    """Per batch the DS pool (clean rows, then their attacked copies) and its top ``p_up`` by cross-entropy
    (scored with batch statistics, the running ones left as they are); the adversarial share of the selected."""
    all_rows, selected, adv_share = [], [], []
    for i, (x, y) in enumerate(batches):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        x_adv = train_attack(model, x, y, generator=g)
        pool_x, pool_y = torch.cat([x, x_adv]), torch.cat([y, y])
        with torch.no_grad(), model_mode(model, "train"):
            scores = per_sample_loss(model(pool_x), pool_y)
        k = max(1, round(p_up * len(pool_y)))
        top = scores.topk(k).indices
        all_rows.append(pool_x)
        selected.append(pool_x[top])
        adv_share.append(float((top >= len(y)).float().mean()))
    return all_rows, selected, sum(adv_share) / len(adv_share)


def evaluate(model: nn.Module, x: Tensor, y: Tensor, eps: float, size: int, seed: int,
             autoattack: bool) -> dict[str, float]:
    """Accuracy (%) on the clean images, under PGD-20 (cross-entropy, margin) and AutoAttack ``apgd``."""
    clean = correct(model, x, y, size)
    out = {"clean": 100 * float(clean.float().mean())}
    for name, loss in (("PGD-20 CE", None), ("PGD-20 margin", margin_loss)):
        def run(a: Tensor, b: Tensor, loss=loss) -> Tensor:  # noqa: ANN001
            g = torch.Generator().manual_seed(seed)
            return pgd(model, a, b, eps=eps, alpha=0.01, steps=20, generator=g, loss=loss)
        adv = in_batches(run, x, y, size)
        out[name] = 100 * float((correct(model, adv, y, size) & clean).float().mean())
    if autoattack:
        attack = AutoAttackConfig(eps=eps, version="apgd", seed=seed)
        adv = torch.cat([attack(model, x[i:i + AA_BATCH], y[i:i + AA_BATCH], batch_idx=i // AA_BATCH)
                         for i in range(0, len(y), AA_BATCH)])
        out["AutoAttack apgd"] = 100 * float((correct(model, adv, y, size) & clean).float().mean())
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", type=Path, nargs="+", help="checkpoints the command line wrote")
    parser.add_argument("--batches", type=int, default=20, help="training batches the statistics are taken over")
    parser.add_argument("--images", type=int, default=500, help="first test images to attack")
    parser.add_argument("--p-up", type=float, default=0.5, help="fraction of each pool in the `selected` variant")
    parser.add_argument("--no-autoattack", action="store_true", help="PGD only (minutes faster per variant)")
    parser.add_argument("--batch-size", type=int, default=250, help="test images per forward pass")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, value, low in (("--batches", args.batches, 1), ("--images", args.images, 1)):
        if value < low:
            parser.error(f"{name} must be >= {low}, got {value}")
    if not 0 < args.p_up <= 1:
        parser.error(f"--p-up must be in (0, 1], got {args.p_up}")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    torch.manual_seed(args.seed)

    for ckpt in args.ckpt:
        module, config = load_module(ckpt)
        model = module.pixel_model.eval()
        if not batch_norms(model):
            raise SystemExit(f"{ckpt}: the model has no BatchNorm layer with running statistics")
        train_attack = module.settings.train_attack
        x, y = test_images(config, args.images)
        batches = training_batches(config, args.batches)
        all_rows, selected, adv_share = pools(model, train_attack, batches, args.p_up, args.seed)
        variants = {"as trained": model,
                    "clean": recalibrated(model, [bx for bx, _ in batches]),
                    "pool": recalibrated(model, all_rows),
                    "selected": recalibrated(model, selected)}
        print(f"\n{ckpt}: {len(y)} test images, eps {train_attack.eps:.5f}; statistics over {args.batches} "
              f"training batches of {len(batches[0][1])}; the top {args.p_up:g} of their pools (PGD "
              f"{train_attack.steps} steps, mode {train_attack.mode}) are {100 * adv_share:.1f}% adversarial\n")
        print("| statistics | clean % | PGD-20 CE % | PGD-20 margin % | AutoAttack apgd % | mean shift (clean stds) "
              "| abs log var ratio |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name, variant in variants.items():
            acc = evaluate(variant, x, y, train_attack.eps, args.batch_size, args.seed, not args.no_autoattack)
            shift, ratio = distance(variant, variants["clean"])
            aa = f"{acc['AutoAttack apgd']:.1f}" if "AutoAttack apgd" in acc else "-"
            print(f"| {name} | {acc['clean']:.1f} | {acc['PGD-20 CE']:.1f} | {acc['PGD-20 margin']:.1f} | {aa} "
                  f"| {shift:.3f} | {ratio:.3f} |", flush=True)


if __name__ == "__main__":
    main()
