"""Robust accuracy under AutoAttack (Croce and Hein, 2020, arXiv:2003.01690), through ``torchattacks``.

PGD with a fixed step size can overstate robustness by tens of points: the field reports robust accuracy
under AutoAttack, an ensemble of parameter-free attacks. This file runs the maintained implementation in
``torchattacks`` (an optional extra: ``pip install "lightning-advsel[eval]"``) instead of re-implementing it,
and makes it safe to call from anywhere a Lightning evaluation loop runs:

* Lightning's test loop runs under inference mode, where no tensor requires grad: the attack leaves it and
  enables gradients.
* torchattacks binds the device when an attack is built, so a fresh attack is built per call on the
  input's device.
* APGD, APGD-T, FAB and Square reseed the *global* random generators on every call: the CPU generator and
  the CUDA one are forked, so the caller's random stream is the same after an evaluation as before.
* The attack runs in full precision (autocast off) and in eval mode; every submodule's mode is restored.

Versions:

* ``"standard"``: torchattacks' ``AutoAttack(version="standard")``: APGD-CE, APGD-T (9 target classes on
  10 classes), FAB-T and Square (5000 queries), each on the rows the previous ones left correctly classified.
* ``"apgd"``: the first two of those, APGD-CE and APGD-T with the same settings, built from torchattacks'
  ``APGD(loss="ce")`` and ``APGDT`` in its ``MultiAttack``. It is the cheaper pair that does most of the work;
  per sample, ``"standard"`` with the same seed breaks a superset of the rows it breaks.

torchattacks runs APGD, APGD-T and FAB-T with 10 iterations each (the reference implementation uses 100), so
its robust accuracy is at or above the reference's; Square's 5000 queries are the reference's.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from lightning_advsel.attacks import NORMS, Norm, _check_inputs, model_mode
from lightning_advsel.checks import Pixels, check_choice, check_int, check_linf_eps, check_number, plain_pixels

Version = Literal["standard", "apgd"]
VERSIONS: tuple[str, ...] = get_args(Version)
INSTALL_HINT = 'pip install "lightning-advsel[eval]"  (or: pip install "torchattacks>=3.5")'
_TORCHATTACKS_NORMS = {"linf": "Linf", "l2": "L2"}


def require_torchattacks() -> Any:
    """Import ``torchattacks``, or fail with the command that installs it.

    Raises:
        ImportError: when ``torchattacks`` is not installed, naming the pip command to run.
    """
    try:
        import torchattacks
    except ImportError as err:
        raise ImportError(
            f"AutoAttack evaluation needs the optional package torchattacks, which is not installed; run: "
            f"{INSTALL_HINT}"
        ) from err
    return torchattacks


def batch_seed(seed: int, batch_idx: int) -> int:
    """The seed of one evaluation batch: batches draw different random starts, and a rerun draws the same."""
    return (seed * 1_000_003 + batch_idx) % (2**63 - 1)


def _check_settings(eps: float, norm: str, version: str, seed: int) -> None:
    check_number("eps", eps, 0, strict=True, unit="pixel units")
    check_choice("norm", norm, NORMS)
    check_linf_eps("eps", eps, norm)
    check_choice("version", version, VERSIONS)
    check_int("seed", seed, 0)


def _build(torchattacks: Any, model: nn.Module, eps: float, norm: str, version: str, num_classes: int,
           seed: int) -> Any:
    """A fresh torchattacks attack; its device is that of ``model``'s parameters."""
    norm = _TORCHATTACKS_NORMS[norm]
    if version == "standard":
        return torchattacks.AutoAttack(model, norm=norm, eps=eps, version="standard", n_classes=num_classes,
                                       seed=seed)
    # AutoAttack's first two stages with its settings (one restart each, default steps, the same seed).
    return torchattacks.MultiAttack([
        torchattacks.APGD(model, norm=norm, eps=eps, seed=seed, loss="ce", n_restarts=1),
        torchattacks.APGDT(model, norm=norm, eps=eps, seed=seed, n_classes=num_classes, n_restarts=1),
    ])


def _cuda_devices(x: Tensor) -> list[int]:
    """CUDA devices whose generator the attack may reseed: the input's and the current one.

    torchattacks reseeds the current CUDA device's generator even for CPU inputs (lazily, at CUDA's first use,
    if CUDA is not yet initialized), so with CUDA available its state is saved, which initializes CUDA.
    """
    if not torch.cuda.is_available():
        return []
    devices = {torch.cuda.current_device()}
    if x.is_cuda:
        devices.add(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return sorted(devices)


def autoattack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: Norm = "linf",
    version: Version = "standard",
    seed: int = 0,
    num_classes: int | None = None,
) -> Tensor:
    """AutoAttack adversarial examples from torchattacks, leaving the caller's state as it was.

    Runs outside inference mode with gradients enabled, with autocast off, in eval mode (every submodule's
    mode restored afterwards) and inside a fork of the global CPU and CUDA random generators, seeded with
    ``seed``: the same call gives the same examples, and the caller's random stream is untouched.

    Args:
        model: classifier taking inputs in [0, 1] of shape ``(B, C, H, W)`` and returning logits ``(B, K)``.
        x: clean inputs in [0, 1], shape ``(B, C, H, W)``.
        y: integer labels, shape ``(B,)``.
        eps: radius of the threat model in pixel units.
        norm: ``"linf"`` or ``"l2"``.
        version: ``"standard"`` (APGD-CE, APGD-T, FAB-T, Square) or ``"apgd"`` (APGD-CE, APGD-T).
        seed: seed of the attacks' random starts.
        num_classes: classes of the model's output (APGD-T and FAB-T target all but the true one); read from
            one forward pass of ``x[:1]`` when ``None``.

    Returns:
        Detached adversarial inputs of the shape of ``x``, within eps of ``x`` and in [0, 1]; rows no attack
        broke are returned unchanged.

    Raises:
        ValueError: for ``eps`` not in (0, 1] (L-inf) or not positive (L2), an unknown ``norm`` or ``version``,
            a negative ``seed``, inputs that are not ``(B, C, H, W)`` pixels in [0, 1], or labels that are not
            class indices.
        ImportError: when torchattacks is not installed, naming the pip command.
    """
    _check_settings(eps, norm, version, seed)
    _check_inputs(x, y, eps, norm)
    if x.dim() != 4:
        raise ValueError(f"`x` must have shape (B, C, H, W) for torchattacks, got {tuple(x.shape)}")
    torchattacks = require_torchattacks()
    if x.shape[0] == 0:
        return x.detach().clone()
    with ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autocast(device_type=x.device.type, enabled=False))
        stack.enter_context(torch.random.fork_rng(devices=_cuda_devices(x)))
        stack.enter_context(model_mode(model, "eval"))
        # Clones made outside inference mode are ordinary tensors that autograd may save.
        x, y = x.detach().clone(), y.detach().clone()
        if num_classes is None:
            with torch.no_grad():
                num_classes = int(model(x[:1]).shape[1])
        attack = _build(torchattacks, model, eps, norm, version, num_classes, seed)
        return attack(x, y).detach()


class _ByClassPath:
    """Base class that keeps :class:`AutoAttackConfig` from being a *pure* dataclass.

    jsonargparse parses a pure dataclass by its fields alone and drops the class name, so in the union
    ``AutoAttackConfig | AttackConfig`` the first type whose fields fit wins, whatever the user named. A class
    with a non-dataclass base is parsed by its ``class_path``, so naming ``AutoAttackConfig`` on the command
    line or in YAML builds one, and a field-only spelling (``eps``, ``steps``, ...) builds an ``AttackConfig``.
    It must also come first in the union (``AutoAttackConfig | AttackConfig``): listed after the dataclass,
    jsonargparse 4.53 applies ``--test_attack.eps`` after ``--test_attack AutoAttackConfig`` to the dataclass.
    """


@dataclass(frozen=True)
class AutoAttackConfig(_ByClassPath):
    """AutoAttack as the test-time attack: ``AdversarialSelectionModule(test_attack=AutoAttackConfig(eps=...))``.

    Each evaluation batch is attacked with the seed ``batch_seed(seed, batch_idx)``, so batches draw
    different random starts and a rerun on the same weights gives the same accuracy.

    Args:
        eps: threat-model radius in pixel units (inputs in [0, 1]), > 0.
        norm: ``"linf"`` or ``"l2"``.
        version: ``"standard"`` (torchattacks' AutoAttack: APGD-CE, APGD-T, FAB-T, Square) or ``"apgd"``
            (APGD-CE and APGD-T only, with the same settings; cheaper).
        seed: seed of the attacks' random starts.

    Raises:
        ValueError: as :func:`autoattack`, at construction time.
        ImportError: at construction time when torchattacks is not installed, naming the pip command.
    """

    eps: Pixels  # radius, pixels; "8/255" is read as a fraction
    norm: Norm = "linf"
    version: Version = "standard"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "eps", plain_pixels(self.eps))
        _check_settings(self.eps, self.norm, self.version, self.seed)
        require_torchattacks()

    @property
    def enabled(self) -> bool:
        return True

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, *, batch_idx: int = 0,
                 num_classes: int | None = None) -> Tensor:
        return autoattack(model, x, y, eps=self.eps, norm=self.norm, version=self.version,
                          seed=batch_seed(self.seed, batch_idx), num_classes=num_classes)

    def describe(self) -> str:
        attacks = "APGD-CE, APGD-T, FAB-T, Square" if self.version == "standard" else "APGD-CE, APGD-T"
        return f"AutoAttack {self.version} ({attacks}) {self.norm} eps={self.eps:g} seed={self.seed}"
