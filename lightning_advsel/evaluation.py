"""Robust accuracy under AutoAttack (Croce and Hein, 2020, arXiv:2003.01690): the reference code, or torchattacks'.

PGD with a fixed step size can overstate robustness by tens of points: the field reports robust accuracy under
AutoAttack, an ensemble of parameter-free attacks, each run on the rows the previous ones left correctly
classified. Two implementations are wrapped, both optional extras (``pip install "lightning-advsel[eval]"``):

* ``"reference"`` (the default): Croce and Hein's own code, packaged as ``pyautoattack``: the numbers that
  papers and RobustBench report. APGD-CE, APGD-T and FAB-T run 100 iterations each.
* ``"torchattacks"``: torchattacks' port, which runs APGD-CE, APGD-T and FAB-T with 10 iterations each, so its
  robust accuracy is at or above the reference's (Square's 5000 queries are the same). Several times cheaper.

Versions (the stages run in this order):

* ``"standard"``: APGD-CE, APGD-T, FAB-T, Square (5000 queries); the reference's ``version="standard"``.
* ``"apgd"``: APGD-CE and APGD-T with the standard version's settings: the cheaper pair that does most of the
  work. Per row, ``"standard"`` with the same seed breaks a superset of the rows it breaks.
* ``"rand"``: APGD-CE and APGD-DLR, each averaging 20 gradient draws per iteration (EOT), for defences whose
  output is random; the reference's ``version="rand"``.

APGD-T and FAB-T target the ``min(9, num_classes - 1)`` classes with the highest logits (the reference's 9 on 10
classes); torchattacks' port targets all ``num_classes - 1``.

Both are made safe to call from anywhere a Lightning evaluation loop runs:

* Lightning's test loop runs under inference mode, where no tensor requires grad: the attack leaves it and
  enables gradients.
* Both libraries bind the device when an attack is built, so a fresh attack is built per call on the input's
  device.
* Both reseed the *global* random generators on every call: the CPU generator and the CUDA ones are forked, so
  the caller's random stream is the same after an evaluation as before.
* The attack runs in full precision (autocast off) and in eval mode, with the parameters frozen (the reference
  backpropagates through the model, which would add to their ``.grad``); every submodule's mode and every
  parameter's ``requires_grad`` are restored.
* The reference's check for dynamic defences replaces the Python trace function (a debugger's, coverage's); it
  is put back.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from lightning_advsel.attacks import NORMS, Norm, _check_inputs, model_mode
from lightning_advsel.checks import Pixels, check_choice, check_int, check_linf_eps, check_number, plain_pixels

Version = Literal["standard", "apgd", "rand"]
VERSIONS: tuple[str, ...] = get_args(Version)
Implementation = Literal["reference", "torchattacks"]
IMPLEMENTATIONS: tuple[str, ...] = get_args(Implementation)
PACKAGES = {"reference": "pyautoattack", "torchattacks": "torchattacks"}  # implementation -> distribution
INSTALL_HINT = 'pip install "lightning-advsel[eval]"'
STAGES = {"standard": ("apgd-ce", "apgd-t", "fab-t", "square"), "apgd": ("apgd-ce", "apgd-t"),
          "rand": ("apgd-ce", "apgd-dlr")}
# The DLR loss reads the third-largest logit; its targeted form also the fourth.
MIN_CLASSES = {"standard": 4, "apgd": 4, "rand": 3}
MAX_TARGETS = 9  # target classes of APGD-T and FAB-T in the reference's standard version
STAGE_NAMES = {"apgd-ce": "APGD-CE", "apgd-t": "APGD-T", "apgd-dlr": "APGD-DLR", "fab-t": "FAB-T",
               "square": "Square"}
_NORMS = {"linf": "Linf", "l2": "L2"}  # both libraries' spelling


def require(implementation: str = "reference") -> Any:
    """Import the package behind ``implementation``, or fail with the command that installs it.

    Raises:
        ImportError: when the package is not installed, naming the pip command to run.
    """
    package = PACKAGES[implementation]
    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise ImportError(
            f"AutoAttack with `implementation`={implementation!r} needs the optional package {package}, which is "
            f"not installed; run: {INSTALL_HINT}  (or: pip install {package})"
        ) from err


def library(implementation: str) -> str:
    """The package behind ``implementation`` and its installed version, e.g. ``"pyautoattack 0.2.0"``."""
    package = PACKAGES[implementation]
    return f"{package} {metadata.version(package)}"


def batch_seed(seed: int, batch_idx: int) -> int:
    """The seed of one evaluation batch: batches draw different random starts, and a rerun draws the same."""
    return (seed * 1_000_003 + batch_idx) % (2**63 - 1)


def _check_settings(eps: float, norm: str, version: str, seed: int, implementation: str) -> None:
    check_number("eps", eps, 0, strict=True, unit="pixel units")
    check_choice("norm", norm, NORMS)
    check_linf_eps("eps", eps, norm)
    check_choice("version", version, VERSIONS)
    check_int("seed", seed, 0)
    check_choice("implementation", implementation, IMPLEMENTATIONS)


def check_classes(version: str, num_classes: int) -> None:
    """Raise unless the model's ``num_classes`` suit ``version``'s losses (before any attack runs).

    Raises:
        ValueError: for fewer classes than the DLR losses read (4 for ``standard`` and ``apgd``, 3 for ``rand``).
    """
    need = MIN_CLASSES[version]
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < need:
        raise ValueError(f"AutoAttack {version} needs a classifier of at least {need} classes (its DLR loss reads "
                         f"the logits below the top two), got `num_classes`={num_classes!r}")


# ------------------------------------------------------------------------------------------------ the ensembles
def _reference(pyautoattack: Any, model: nn.Module, eps: float, norm: str, version: str, num_classes: int,
               seed: int, device: torch.device) -> Any:
    """The reference's ``AutoAttack`` for ``version``, on ``device`` (it must be the inputs')."""
    if version == "apgd":  # no such version in the reference: its standard version's first two attacks
        attack = pyautoattack.AutoAttack(model, attacks=list(STAGES["apgd"]), version="custom", eps=eps,
                                         norm=_NORMS[norm], seed=seed, device=device)
        attack.apgd.n_restarts = 1
        attack.apgd_targeted.n_restarts = 1
    else:
        attack = pyautoattack.AutoAttack(model, version=version, eps=eps, norm=_NORMS[norm], seed=seed, device=device)
    targets = min(MAX_TARGETS, num_classes - 1)
    attack.apgd_targeted.n_target_classes = targets
    attack.fab.n_target_classes = targets
    return attack


def _torchattacks(torchattacks: Any, model: nn.Module, eps: float, norm: str, version: str, num_classes: int,
                  seed: int) -> dict[str, Any]:
    """torchattacks' attacks of ``version`` by stage, with its ``AutoAttack``'s settings; their device is that of
    ``model``'s parameters."""
    common = {"norm": _NORMS[norm], "eps": eps, "seed": seed}
    if version == "rand":
        return {"apgd-ce": torchattacks.APGD(model, loss="ce", eot_iter=20, n_restarts=1, **common),
                "apgd-dlr": torchattacks.APGD(model, loss="dlr", eot_iter=20, n_restarts=1, **common)}
    stages = {"apgd-ce": torchattacks.APGD(model, loss="ce", n_restarts=1, **common),
              "apgd-t": torchattacks.APGDT(model, n_classes=num_classes, n_restarts=1, **common)}
    if version == "standard":
        stages["fab-t"] = torchattacks.FAB(model, multi_targeted=True, n_classes=num_classes, n_restarts=1, **common)
        stages["square"] = torchattacks.Square(model, n_queries=5000, n_restarts=1, **common)
    return stages


# What each stage's budget is read from, and the attribute each library keeps it in.
_STAGE_KEYS = {"apgd-ce": ("iterations", "restarts", "eot"), "apgd-dlr": ("iterations", "restarts", "eot"),
               "apgd-t": ("iterations", "restarts", "targets"), "fab-t": ("iterations", "restarts", "targets"),
               "square": ("queries",)}
_ATTRIBUTES = {"reference": {"iterations": "n_iter", "queries": "n_queries", "restarts": "n_restarts",
                             "targets": "n_target_classes", "eot": "eot_iter"},
               "torchattacks": {"iterations": "steps", "queries": "n_queries", "restarts": "n_restarts",
                                "targets": "n_target_classes", "eot": "eot_iter"}}


def stage_settings(implementation: str, version: str, num_classes: int = 10) -> dict[str, dict[str, int]]:
    """Each stage's iterations (Square: queries), restarts, target classes and gradient draws per iteration
    (``eot``), read off the attacks the installed library builds for a classifier of ``num_classes``."""
    stand_in = nn.Linear(1, num_classes)  # building an attack calls no model; torchattacks reads its device
    if implementation == "reference":
        built = _reference(require(implementation), stand_in, 0.1, "linf", version, num_classes, 0,
                           torch.device("cpu"))
        attacks = {"apgd-ce": built.apgd, "apgd-dlr": built.apgd, "apgd-t": built.apgd_targeted, "fab-t": built.fab,
                   "square": built.square}
    else:
        attacks = _torchattacks(require(implementation), stand_in, 0.1, "linf", version, num_classes, 0)
    names = _ATTRIBUTES[implementation]
    return {stage: {key: int(getattr(attacks[stage], names[key])) for key in _STAGE_KEYS[stage]}
            for stage in STAGES[version]}


def _stages_reference(model: nn.Module, x: Tensor, y: Tensor, clean: Tensor, eps: float, norm: str, version: str,
                      num_classes: int, seed: int) -> Iterator[tuple[str, Tensor, Tensor]]:
    """``(stage, rows it broke, their adversarial inputs)``, stage by stage, on the rows still correct, starting
    from the ``clean`` rows (the ``(B,)`` booleans of rows classified correctly without an attack).

    Each stage goes through the reference's own ``run_standard_evaluation`` with that one attack and the rows
    the earlier stages left: the same rows, in the same order, in one chunk, with the same seed as its
    ensemble loop, so the same examples; but the rows each stage breaks are known.
    """
    attack = _reference(require("reference"), model, eps, norm, version, num_classes, seed, x.device)
    alive = clean.nonzero().squeeze(1)
    for stage in STAGES[version]:
        if alive.numel() == 0:  # the reference stops here: nothing left to attack
            yield stage, alive, x[:0]
            continue
        attack.attacks_to_run = [stage]
        x_stage, pred = attack.run_standard_evaluation(x[alive], y[alive], batch_size=alive.numel())
        broken = pred != y[alive]
        yield stage, alive[broken], x_stage[broken]
        alive = alive[~broken]


def _stages_torchattacks(model: nn.Module, x: Tensor, y: Tensor, clean: Tensor, eps: float, norm: str,
                         version: str, num_classes: int, seed: int) -> Iterator[tuple[str, Tensor, Tensor]]:
    """As :func:`_stages_reference`, through torchattacks' attacks, as its ``MultiAttack`` runs them: the first
    on every row (``clean`` unread), each next one on the rows still correct, stopping when none is left."""
    alive = torch.arange(x.shape[0], device=x.device)
    for stage, attack in _torchattacks(require("torchattacks"), model, eps, norm, version, num_classes,
                                       seed).items():
        if alive.numel() == 0:
            yield stage, alive, x[:0]
            continue
        x_stage = attack(x[alive], y[alive])
        with torch.no_grad():
            broken = model(x_stage).argmax(1) != y[alive]
        yield stage, alive[broken], x_stage[broken]
        alive = alive[~broken]


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Parameters that need no gradient for the block; each one's ``requires_grad`` restored after it."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@contextmanager
def _trace_function_kept() -> Iterator[None]:
    tracer = sys.gettrace()
    try:
        yield
    finally:
        sys.settrace(tracer)


def _cuda_devices(x: Tensor) -> list[int]:
    """CUDA devices whose generator the attack may reseed: the input's and the current one.

    Both libraries reseed the current CUDA device's generator even for CPU inputs (lazily, at CUDA's first use,
    if CUDA is not yet initialized), so with CUDA available its state is saved, which initializes CUDA.
    """
    if not torch.cuda.is_available():
        return []
    devices = {torch.cuda.current_device()}
    if x.is_cuda:
        devices.add(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return sorted(devices)


@dataclass(frozen=True)
class AutoAttackResult:
    """What one AutoAttack call found.

    Attributes:
        x_adv: detached adversarial inputs, the shape of ``x``; rows no stage broke are ``x`` unchanged.
        clean: ``(B,)`` booleans: the rows the model classifies correctly without an attack.
        robust_after: for each stage in the order run, ``(B,)`` booleans: the rows still correctly classified
            after that stage and every one before it (the last is the robust rows).
    """

    x_adv: Tensor
    clean: Tensor
    robust_after: dict[str, Tensor]


def autoattack_stages(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: Norm = "linf",
    version: Version = "standard",
    seed: int = 0,
    num_classes: int | None = None,
    implementation: Implementation = "reference",
) -> AutoAttackResult:
    """AutoAttack's adversarial examples and the rows left correct after each of its attacks, leaving the
    caller's state as it was.

    Runs outside inference mode with gradients enabled, with autocast off, in eval mode with the parameters
    frozen (every submodule's mode and every parameter's ``requires_grad`` restored afterwards) and inside a
    fork of the global CPU and CUDA random generators, seeded with ``seed``: the same call gives the same
    examples, and the caller's random stream is untouched.

    Args:
        model: classifier taking inputs in [0, 1] of shape ``(B, C, H, W)`` and returning logits ``(B, K)``.
        x: clean inputs in [0, 1], shape ``(B, C, H, W)``.
        y: integer labels, shape ``(B,)``.
        eps: radius of the threat model in pixel units.
        norm: ``"linf"`` or ``"l2"``.
        version: ``"standard"``, ``"apgd"`` or ``"rand"`` (see the module's docstring).
        seed: seed of the attacks' random starts.
        num_classes: classes of the model's output; read from one forward pass of ``x[:1]`` when ``None``.
        implementation: ``"reference"`` (pyautoattack) or ``"torchattacks"``.

    Returns:
        An :class:`AutoAttackResult`; its adversarial rows lie within eps of ``x`` and in [0, 1].

    Raises:
        ValueError: for ``eps`` not in (0, 1] (L-inf) or not positive (L2), an unknown ``norm``, ``version`` or
            ``implementation``, a negative ``seed``, inputs that are not ``(B, C, H, W)`` pixels in [0, 1],
            labels that are not class indices, or fewer classes than ``version`` needs.
        ImportError: when the implementation's package is not installed, naming the pip command.
    """
    _check_settings(eps, norm, version, seed, implementation)
    _check_inputs(x, y, eps, norm)
    if x.dim() != 4:
        raise ValueError(f"`x` must have shape (B, C, H, W) for AutoAttack, got {tuple(x.shape)}")
    require(implementation)
    if num_classes is not None:
        check_classes(version, num_classes)
    if x.shape[0] == 0:
        none = torch.ones(0, dtype=torch.bool, device=x.device)
        return AutoAttackResult(x.detach().clone(), none, {stage: none for stage in STAGES[version]})
    stages = _stages_reference if implementation == "reference" else _stages_torchattacks
    with ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autocast(device_type=x.device.type, enabled=False))
        stack.enter_context(torch.random.fork_rng(devices=_cuda_devices(x)))
        stack.enter_context(model_mode(model, "eval"))
        stack.enter_context(_frozen(model))
        stack.enter_context(_trace_function_kept())
        # Clones made outside inference mode are ordinary tensors that autograd may save.
        x, y = x.detach().clone(), y.detach().clone()
        with torch.no_grad():
            if num_classes is None:
                num_classes = int(model(x[:1]).shape[1])
                check_classes(version, num_classes)
            clean = model(x).argmax(1) == y
        x_adv, robust, robust_after = x.clone(), clean.clone(), {}
        for stage, broken, x_broken in stages(model, x, y, clean, eps, norm, version, num_classes, seed):
            x_adv[broken] = x_broken.detach()
            robust[broken] = False
            robust_after[stage] = robust.clone()
        return AutoAttackResult(x_adv, clean, robust_after)


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
    implementation: Implementation = "reference",
) -> Tensor:
    """AutoAttack's adversarial examples alone: :func:`autoattack_stages`'s ``x_adv``, with the same arguments,
    guarantees and errors."""
    return autoattack_stages(model, x, y, eps=eps, norm=norm, version=version, seed=seed, num_classes=num_classes,
                             implementation=implementation).x_adv


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
        version: ``"standard"`` (APGD-CE, APGD-T, FAB-T, Square), ``"apgd"`` (APGD-CE and APGD-T only, with the
            same settings; cheaper) or ``"rand"`` (APGD-CE and APGD-DLR with 20 gradient draws, for randomized
            defences).
        seed: seed of the attacks' random starts.
        implementation: ``"reference"`` (Croce and Hein's code, pyautoattack: the field's numbers) or
            ``"torchattacks"`` (its port, at a tenth of the iterations).

    Raises:
        ValueError: as :func:`autoattack_stages`, at construction time.
        ImportError: at construction time when the implementation's package is not installed, naming the pip
            command.
    """

    eps: Pixels  # radius, pixels; "8/255" is read as a fraction
    norm: Norm = "linf"
    version: Version = "standard"
    seed: int = 0
    implementation: Implementation = "reference"

    def __post_init__(self) -> None:
        object.__setattr__(self, "eps", plain_pixels(self.eps))
        _check_settings(self.eps, self.norm, self.version, self.seed, self.implementation)
        require(self.implementation)

    @property
    def enabled(self) -> bool:
        return True

    def stages(self, model: nn.Module, x: Tensor, y: Tensor, *, batch_idx: int = 0,
               num_classes: int | None = None) -> AutoAttackResult:
        """:func:`autoattack_stages` of one evaluation batch, seeded by its index."""
        return autoattack_stages(model, x, y, eps=self.eps, norm=self.norm, version=self.version,
                                 seed=batch_seed(self.seed, batch_idx), num_classes=num_classes,
                                 implementation=self.implementation)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, *, batch_idx: int = 0,
                 num_classes: int | None = None) -> Tensor:
        return self.stages(model, x, y, batch_idx=batch_idx, num_classes=num_classes).x_adv

    def describe(self) -> str:
        """The attack in one line, naming the implementation and each stage's iterations (Square: queries)."""
        parts = []
        for stage, values in stage_settings(self.implementation, self.version).items():
            budget = f"{values['queries']} queries" if "queries" in values else f"{values['iterations']} it."
            draws = f" EOT {values['eot']}" if values.get("eot", 1) > 1 else ""
            parts.append(f"{STAGE_NAMES[stage]} {budget}{draws}")
        return (f"AutoAttack {self.version} ({self.implementation}: {', '.join(parts)}) {self.norm} eps={self.eps:g} "
                f"seed={self.seed}")
