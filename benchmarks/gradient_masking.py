"""Is a model's PGD robustness real? The usual checks for an obfuscated gradient, as one table per model.

A model that fixed-step PGD rates robust and AutoAttack does not may have a gradient that misleads the attack
rather than a robust decision (Athalye et al., 2018, arXiv:1802.00420; Carlini et al., 2019, arXiv:1902.06705).
For each checkpoint this script attacks the same test images with attacks that differ in one thing at a time, so
the table says *which* change breaks the model:

* more steps and restarts (PGD-100, 5 restarts): if these break much more than PGD-20, PGD-20 was too short;
* another loss (PGD-20 on the logit margin, as Carlini and Wagner): if it breaks more than on the
  cross-entropy, the cross-entropy's gradient is the misleading part;
* an adaptive step (APGD-CE) and a targeted margin loss (APGD-T, AutoAttack's two gradient stages, run apart);
* a larger radius (PGD-20 at 2x and 4x eps): accuracy that does not fall towards 0 means the gradient does not
  lead out of the class;
* transfer (``--source``): PGD-20 examples made on another model; if they break more than white-box PGD-20,
  the model's own gradient is worse than a stranger's.

It also prints, per model, the median logit margin of the correctly classified clean images, the share of
images whose cross-entropy input gradient is exactly zero (a saturated softmax in float32), and the median
minimum perturbation of the correct images (the DS paper's Fig. 8 measure, :func:`minimum_eps` on a grid of
eps/4 up to 4x eps) as a cross-entropy search and as a margin search finds it: a large gap says the
cross-entropy overstates how far the decision boundary is.

Each checkpoint is one the command line wrote: its run folder (two levels up, as Lightning lays it out) holds
the ``config.yaml`` whose data module gives the test split; the first ``--images`` test images are used, in
the loader's order (the records of ``reproduce.py`` test the same first images).

    python benchmarks/gradient_masking.py benchmarks/runs/cifar10_bn/ds/seed0/checkpoints/best-*.ckpt \\
        --source benchmarks/runs/cifar10_bn/robust/seed1/checkpoints/best-*.ckpt --images 500

Needs the eval extra (``pip install -e ".[eval]"``). Evaluation runs on CPU in float32 and eval mode.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.cli import LightningCLI
from torch import Tensor, nn

from lightning_advsel import AdversarialSelectionModule
from lightning_advsel.attacks import margin_loss, pgd
from lightning_advsel.callbacks import minimum_eps
from lightning_advsel.cli import build_cli
from lightning_advsel.evaluation import require


def load_module(ckpt: Path) -> tuple[AdversarialSelectionModule, Path]:
    """The checkpoint's module, on the CPU, and its run's ``config.yaml``."""
    config = ckpt.resolve().parent.parent / "config.yaml"
    if not config.is_file():
        raise SystemExit(f"no config.yaml in {config.parent} (the run folder of --ckpt {ckpt})")
    return AdversarialSelectionModule.load_from_checkpoint(ckpt, map_location="cpu"), config


def load(ckpt: Path) -> tuple[nn.Module, Path]:
    """The checkpoint's classifier on pixels, in eval mode, and its run's ``config.yaml``."""
    module, config = load_module(ckpt)
    return module.pixel_model.eval(), config


def run_cli(config: Path) -> LightningCLI:
    """The command line of a run's ``config.yaml``, built without running: its model and data module."""
    # Only the model and the data: the file's other keys belong to the fit subcommand (ckpt_path, ...).
    resolved = {k: v for k, v in yaml.safe_load(config.read_text()).items() if k in ("model", "data")}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(resolved, f)
        f.flush()
        return build_cli(["--config", f.name, "--trainer.logger", "false"], run=False)


def test_images(config: Path, images: int) -> tuple[Tensor, Tensor]:
    """The first ``images`` test images (pixels) and labels of the run's data module."""
    cli = run_cli(config)
    datamodule = cli.datamodule
    datamodule.setup("test")
    xs, ys, n = [], [], 0
    for batch in datamodule.test_dataloader():
        x, y, _ = cli.model.read_batch(batch)
        xs.append(x)
        ys.append(y)
        n += len(y)
        if n >= images:
            break
    return torch.cat(xs)[:images], torch.cat(ys)[:images]


def in_batches(fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor, size: int) -> Tensor:
    return torch.cat([fn(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)])


def correct(model: nn.Module, x: Tensor, y: Tensor, size: int) -> Tensor:
    """Per-row bool: is ``x`` classified as ``y``."""
    with torch.no_grad():
        return in_batches(lambda a, b: model(a).argmax(1) == b, x, y, size)


Attack = Callable[[nn.Module, Tensor, Tensor], Tensor]  # (model, x, y) -> adversarial x


def attacks(eps: float, seed: int, apgd_steps: int, num_classes: int) -> dict[str, Attack]:
    """Name -> attack(model, x, y) -> adversarial x; each differs from the PGD-20 row in one setting."""
    torchattacks = require("torchattacks")  # its APGD with a chosen step count

    def pgd_with(steps: int, alpha: float, restarts: int = 1, radius: float = eps, loss=None):  # noqa: ANN001, ANN202
        def run(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
            g = torch.Generator().manual_seed(seed)
            return pgd(model, x, y, eps=radius, alpha=alpha * radius / eps, steps=steps, restarts=restarts,
                       generator=g, loss=loss)
        return run

    def apgd(targeted: bool):  # noqa: ANN202
        def run(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
            if targeted:
                attack = torchattacks.APGDT(model, norm="Linf", eps=eps, steps=apgd_steps, seed=seed,
                                            n_classes=num_classes)
            else:
                attack = torchattacks.APGD(model, norm="Linf", eps=eps, steps=apgd_steps, seed=seed, loss="ce")
            with torch.random.fork_rng():
                return attack(x, y).detach()
        return run

    return {
        "PGD-20, CE, step 0.01 (the records' attack)": pgd_with(20, 0.01),
        "PGD-100, CE, step 2/255, 5 restarts": pgd_with(100, 2 / 255, restarts=5),
        "PGD-20, logit margin, step 0.01": pgd_with(20, 0.01, loss=margin_loss),
        f"APGD-CE, {apgd_steps} steps": apgd(targeted=False),
        f"APGD-T (9 targets), {apgd_steps} steps": apgd(targeted=True),
        "PGD-20, CE, at 2x eps": pgd_with(20, 0.01, radius=2 * eps),
        "PGD-20, CE, at 4x eps": pgd_with(20, 0.01, radius=min(1.0, 4 * eps)),
    }


def gradient_stats(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """Median clean logit margin of the correct rows; share of rows whose CE input gradient is exactly zero."""
    x = x.clone().requires_grad_(True)
    logits = model(x)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x)
    margins = -margin_loss(logits.detach(), y)
    right = margins > 0
    median = float(margins[right].median()) if right.any() else float("nan")
    return median, float((grad.flatten(1).abs().sum(1) == 0).float().mean())


def median_minimum_eps(model: nn.Module, x: Tensor, y: Tensor, eps: float, size: int) -> dict[str, float]:
    """Per search loss (``"ce"``, ``"margin"``), the median minimum perturbation of rows ``x`` (the correctly
    classified ones) on the grid ``eps / 4, eps / 2, ..., 4 eps`` (PGD-5 per radius), pixels; a row no radius
    flips counts as 4 eps; NaN without rows."""
    if len(y) == 0:
        return {"ce": float("nan"), "margin": float("nan")}
    radii = torch.arange(1, 17, dtype=torch.float64) * (eps / 4)
    medians = {}
    for loss in ("ce", "margin"):
        found = in_batches(lambda a, b: minimum_eps(model, a, b, radii, loss=loss)[0],  # noqa: B023
                           x, y, size)
        medians[loss] = float(found.clamp(max=float(radii[-1])).median())
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", type=Path, nargs="+", help="checkpoints the command line wrote")
    parser.add_argument("--source", type=Path, help="a checkpoint whose PGD-20 examples are transferred")
    parser.add_argument("--images", type=int, default=500, help="first test images to attack")
    parser.add_argument("--eps", type=float, default=8 / 255, help="L-inf radius, pixels (default 8/255)")
    parser.add_argument("--apgd-steps", type=int, default=100, help="APGD iterations (AutoAttack's: 100)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.images < 1:
        parser.error(f"--images must be >= 1, got {args.images}")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    torch.manual_seed(args.seed)

    models = {ckpt: load(ckpt) for ckpt in args.ckpt}  # each checkpoint read once: (classifier, config.yaml)
    first, config = models[args.ckpt[0]]
    x, y = test_images(config, args.images)
    with torch.no_grad():
        num_classes = int(first(x[:1]).shape[1])
    table = attacks(args.eps, args.seed, args.apgd_steps, num_classes)
    transferred = None
    if args.source is not None:
        source, _ = load(args.source)
        transferred = in_batches(lambda a, b: table["PGD-20, CE, step 0.01 (the records' attack)"](source, a, b),
                                 x, y, args.batch_size)

    for ckpt, (model, _) in models.items():
        clean = correct(model, x, y, args.batch_size)
        worst = clean.clone()
        rows = [("clean", clean, 0.0)]
        for name, attack in table.items():
            started = time.perf_counter()
            adv = in_batches(lambda a, b: attack(model, a, b), x, y, args.batch_size)  # noqa: B023
            ok = correct(model, adv, y, args.batch_size) & clean
            if "x eps" not in name:
                worst &= ok
            rows.append((name, ok, time.perf_counter() - started))
        if transferred is not None:
            ok = correct(model, transferred, y, args.batch_size) & clean
            worst &= ok
            rows.append((f"transfer: PGD-20 on {args.source.parent.parent.parent.name}/"
                         f"{args.source.parent.parent.name}", ok, 0.0))
        rows.append(("worst case over the attacks within eps (per image)", worst, 0.0))
        median, zero = gradient_stats(model, x, y)
        radius = median_minimum_eps(model, x[clean], y[clean], args.eps, args.batch_size)
        print(f"\n{ckpt}: {len(y)} test images, eps {args.eps:.5f}; median clean logit margin of the correct rows "
              f"{median:.2f}; CE input gradient exactly zero on {100 * zero:.1f}% of the images; median minimum "
              f"perturbation of the correct rows {255 * radius['ce']:.1f}/255 by a CE search, "
              f"{255 * radius['margin']:.1f}/255 by a margin search\n")
        print("| attack | accuracy % | wall s |")
        print("| --- | ---: | ---: |")
        for name, ok, seconds in rows:
            print(f"| {name} | {100 * ok.float().mean():.1f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
