"""Adversarial attacks as pure functions of ``(model, x, y)``.

Every attack here takes inputs in the pixel range [0, 1] (normalization lives inside the model, so every
epsilon is in pixel units), returns adversarial inputs of the same shape and dtype in [0, 1], and never
touches the model's parameter ``.grad``: input gradients come from :func:`torch.autograd.grad`, so no
DistributedDataParallel gradient hook fires inside the attack.

The model's train/eval mode during the attack is the explicit ``mode`` argument (see :func:`model_mode`);
it is restored afterwards.

Mixed precision: inside a bfloat16 autocast region (Lightning's ``precision="bf16-mixed"``) the attack runs in
bfloat16 too; inside a float16 one it switches autocast off and runs in float32, so its input gradients cannot
underflow (:func:`attack_precision`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_advsel.checks import Pixels, check_choice, check_int, check_linf_eps, check_number, plain_pixels

Norm = Literal["linf", "l2"]
Mode = Literal["eval", "train", "keep"]
AttackLoss = Literal["ce", "margin"]
NORMS: tuple[str, ...] = get_args(Norm)
MODES: tuple[str, ...] = get_args(Mode)
ATTACK_LOSSES: tuple[str, ...] = get_args(AttackLoss)


def margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """The largest wrong logit minus the true one, per row ``(B,)``: positive once a row is misclassified.

    Carlini and Wagner's margin (arXiv:1608.04644), an attack loss for :func:`pgd` (``loss=margin_loss``) and
    ``AttackConfig(loss="margin")``. Against a model whose outputs are near uniform, raising the cross-entropy
    spreads a perturbation over every wrong class; the margin follows the nearest one, which is what flips the
    prediction. It needs at least two classes.
    """
    true = logits.gather(1, y[:, None]).squeeze(1)
    wrong = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return wrong - true


# BatchNorm forwards that read ``track_running_stats`` at each call (torch's own layers and their subclasses
# that keep the forward), which model_mode can switch off for a block instead of saving the buffers.
_TORCH_BATCHNORM_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)


@contextmanager
def model_mode(model: nn.Module, mode: Mode) -> Iterator[nn.Module]:
    """Run a block with ``model`` in a given mode and restore every submodule's mode afterwards.

    Args:
        model: the network.
        mode: ``"eval"``: running statistics of BatchNorm, no dropout. ``"train"``: batch statistics
            (and dropout), but BatchNorm running statistics are left exactly as they were, so an attack
            or a scoring pass never shifts them. ``"keep"``: whatever mode the model is in.

    Raises:
        ValueError: if ``mode`` is not one of ``"eval"``, ``"train"``, ``"keep"``.
    """
    check_choice("mode", mode, MODES)
    flags = [(m, m.training) for m in model.modules()]
    untracked: list[_BatchNorm] = []
    saved: list[tuple[_BatchNorm, Tensor, Tensor, Tensor]] = []
    if mode == "eval":
        model.eval()
    elif mode == "train":
        model.train()
        for m in model.modules():
            if not (isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None):
                continue
            if type(m).forward in _TORCH_BATCHNORM_FORWARDS:
                # torch's BatchNorm in training mode with tracking off normalizes by the batch's statistics, as
                # with it on, and leaves the buffers alone: no copy of them, and no kernel to restore them.
                m.track_running_stats = False
                untracked.append(m)
            else:  # a forward of its own: keep the buffers' values and put them back afterwards
                saved.append((m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()))
    try:
        yield model
    finally:
        for m in untracked:
            m.track_running_stats = True
        with torch.no_grad():
            for m, mean, var, count in saved:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
        for m, flag in flags:
            m.training = flag


def _check_attack_args(eps: float, alpha: float, steps: int, norm: str, restarts: int) -> None:
    check_number("eps", eps, 0, unit="pixel units")
    check_number("alpha", alpha, 0, unit="pixel units")
    check_choice("norm", norm, NORMS)
    check_linf_eps("eps", eps, norm)
    check_int("steps", steps, 1)
    check_int("restarts", restarts, 1)


def _check_inputs(x: Tensor, y: Tensor, eps: float, norm: str) -> None:
    """Inputs are finite pixels in [0, 1] with one integer label each; an L2 ball fits in the pixel cube."""
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError(f"`x` must be a tensor of shape (B, C, H, W) or (B, D), got {getattr(x, 'shape', type(x))}")
    if not isinstance(y, Tensor) or y.is_floating_point() or tuple(y.shape) != (x.shape[0],):
        got = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"`y` must be integer labels of shape ({x.shape[0]},), got {got}")
    if x.numel() and bool((~torch.isfinite(x) | (x < 0) | (x > 1)).any()):
        # repr, not :g: six significant digits would show 1.0000001 as 1, a value inside the range.
        raise ValueError(
            f"`x` must hold finite pixels in [0, 1] (normalization belongs inside the model), got values in "
            f"[{x.nan_to_num().min().item()!r}, {x.nan_to_num().max().item()!r}]"
            f"{' with NaN or inf' if not bool(torch.isfinite(x).all()) else ''}"
        )
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"`y` must hold class indices >= 0, got {int(y.min())}")
    if norm == "l2" and x.numel() and eps > math.sqrt(x[0].numel()):
        raise ValueError(
            f"`eps` must be at most sqrt({x[0].numel()}) = {math.sqrt(x[0].numel()):.4g} for the l2 norm on inputs "
            f"of {x[0].numel()} pixels in [0, 1] (the diameter of the pixel cube), got {eps}"
        )


def _check_logits(logits: Tensor, y: Tensor) -> None:
    if logits.dim() != 2 or logits.shape[0] != y.shape[0]:
        raise ValueError(
            f"`model` must return logits of shape (B, num_classes) = ({y.shape[0]}, K), got {tuple(logits.shape)}"
        )
    if int(y.max()) >= logits.shape[1]:
        raise ValueError(f"`y` must hold class indices below the model's {logits.shape[1]} classes, got {int(y.max())}")


def _per_sample_norm(t: Tensor) -> Tensor:
    """L2 norm of each sample, shaped to broadcast against ``t``."""
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def _random_start(x: Tensor, eps: float, norm: str, generator: torch.Generator | None) -> Tensor:
    if norm == "linf":
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (2 * u - 1) * eps
    direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    radius = torch.rand((x.shape[0],), generator=generator, device=x.device, dtype=x.dtype)
    radius = radius.view(-1, *([1] * (x.dim() - 1)))
    return direction / _per_sample_norm(direction) * radius * eps


def _project(delta: Tensor, x: Tensor, eps: float | Tensor, norm: str) -> Tensor:
    """Clamp twice: into the eps ball, then so that ``x + delta`` stays in [0, 1]."""
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _per_sample_norm(delta)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0) - x


def draw_start(x: Tensor, attack: AttackConfig, generator: torch.Generator | None,
               start_std: float | None = None) -> Tensor:
    """The starting perturbation of one PGD restart, before projection, shape of ``x``: zero without
    ``random_start``, Gaussian noise of ``start_std`` pixels when given (TRADES), else a uniform point in the eps
    ball. Drawn from ``generator``, so the eager and the compiled attack (which takes its starts as an input) start
    from the same points."""
    if not attack.random_start:
        return torch.zeros_like(x)
    if start_std is not None:
        return start_std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return _random_start(x, attack.eps, attack.norm, generator)


def ascend(delta: Tensor, grad: Tensor, x: Tensor, eps: float | Tensor, alpha: float | Tensor, norm: str) -> Tensor:
    """One PGD step on the perturbation ``delta`` of ``x``: ``alpha`` along the sign of the input gradient (L-inf)
    or the normalized gradient (L2), then projected (:func:`_project`). ``eps`` and ``alpha`` in pixels, Python
    numbers (the eager loop) or 0-d tensors (the compiled one, so that a changing radius is no new graph)."""
    step = alpha * grad.sign() if norm == "linf" else alpha * grad / _per_sample_norm(grad)
    return _project(delta + step, x, eps, norm)


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    norm: Norm = "linf",
    random_start: bool = True,
    restarts: int = 1,
    mode: Mode = "eval",
    generator: torch.Generator | None = None,
    loss: Callable[[Tensor, Tensor], Tensor] | None = None,
    start_std: float | None = None,
) -> Tensor:
    """Projected gradient descent on the cross-entropy (Madry et al., 2018, arXiv:1706.06083), or on ``loss``.

    Each step moves by ``alpha`` along the sign of the input gradient (L-inf) or the normalized gradient
    (L2), then projects onto the eps ball around ``x`` and onto [0, 1]. With ``restarts > 1`` the attack is
    repeated from fresh random starts and, per sample, the example that is misclassified (else the one
    with the highest loss) is kept.

    Args:
        model: classifier taking inputs in [0, 1] of shape ``(B, C, H, W)`` and returning logits ``(B, K)``.
        x: clean inputs in [0, 1], shape ``(B, C, H, W)``.
        y: integer labels, shape ``(B,)``.
        eps: radius of the threat model in pixel units (``8/255`` is 0.0314).
        alpha: step size in pixel units.
        steps: number of gradient steps (>= 1).
        norm: ``"linf"`` or ``"l2"``.
        random_start: start from a uniform point in the eps ball instead of ``x``.
        restarts: number of random restarts (>= 1).
        mode: model mode during the attack, see :func:`model_mode`.
        generator: random generator for the start points; the global one if ``None``.
        loss: what the attack maximises, ``loss(logits, y)`` -> per-sample values ``(B,)``; ``None`` is the
            cross-entropy. TRADES maximises the KL divergence to the clean prediction
            (:mod:`lightning_advsel.objectives`).
        start_std: with ``random_start``, start from Gaussian noise of this standard deviation (pixels; TRADES
            uses 0.001) instead of a uniform point in the eps ball.

    Returns:
        Detached adversarial inputs of the shape of ``x``, within eps of ``x`` and in [0, 1].

    Raises:
        ValueError: for a negative or non-finite ``eps`` / ``alpha``, L-inf ``eps > 1``, L2 ``eps`` above the
            diameter of the pixel cube, ``steps`` or ``restarts`` below 1, an unknown ``norm`` / ``mode``, inputs
            that are not finite pixels in [0, 1], labels that are not class indices of the model's output, or
            a model that does not return ``(B, K)`` logits.
    """
    attack = AttackConfig(eps=eps, alpha=alpha, steps=steps, norm=norm, random_start=random_start, restarts=restarts,
                          mode=mode)  # checks the settings
    attack.check_batch(x, y)
    return _pgd_loop(model, x, y, attack, generator, loss, start_std, check_logits=True)


def attack_precision(device_type: str) -> AbstractContextManager:
    """The autocast setting PGD runs under inside a mixed-precision region of ``device_type``.

    bfloat16 autocast stays on: bfloat16 has float32's exponent range, so an input gradient does not underflow
    (only its mantissa is shorter, and PGD reads its sign or direction). float16 autocast is switched off for
    the attack, which then runs in float32: a confident model's loss gradient (``softmax - onehot``, below
    1e-8 per logit) flushes to zero in float16, ``sign(0)`` is no step, and the attack would silently weaken
    (a higher robust accuracy than the weights deserve). Scaling the loss instead would need GradScaler-style
    overflow checks, a host sync per PGD step.
    """
    if _autocast_dtype(device_type) == torch.float16:
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype of the autocast region active on ``device_type``, ``None`` outside one."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    if device_type == "cuda":
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    return None


def _pgd_loop(model: nn.Module, x: Tensor, y: Tensor, attack: AttackConfig, generator: torch.Generator | None,
              loss: Callable[[Tensor, Tensor], Tensor] | None, start_std: float | None,
              check_logits: bool = False) -> Tensor:
    """:func:`pgd` with the settings of ``attack``, without checking them or the batch (see :func:`pgd`).

    ``check_logits`` checks the model's output shape at the first step (a host sync).
    """
    eps, alpha, steps, norm, restarts = attack.eps, attack.alpha, attack.steps, attack.norm, attack.restarts
    if loss is None and attack.loss == "margin":  # a caller's loss (a training objective's) wins
        loss = margin_loss
    if x.shape[0] == 0:
        return x.detach().clone()
    # Lightning runs validation and test under inference mode; the attack needs autograd back.
    with (torch.inference_mode(False), torch.enable_grad(), attack_precision(x.device.type),
          model_mode(model, attack.mode)):
        x = x.detach().clone()
        y = y.detach().to(torch.long, copy=True)  # a normal tensor (not an inference one), int64 for the loss
        best = x.clone()
        best_score = torch.full((x.shape[0],), -math.inf, device=x.device)
        checked = not check_logits
        for _ in range(restarts):
            delta = _project(draw_start(x, attack, generator, start_std), x, eps, norm)
            for _ in range(steps):
                delta.requires_grad_(True)
                logits = model(x + delta)
                if not checked:
                    _check_logits(logits, y)
                    checked = True
                value = F.cross_entropy(logits, y, reduction="sum") if loss is None else loss(logits, y).sum()
                (grad,) = torch.autograd.grad(value, delta)
                delta = ascend(delta.detach(), grad, x, eps, alpha, norm)
            if restarts == 1:
                return (x + delta).detach()
            with torch.no_grad():
                logits = model(x + delta)
                score = F.cross_entropy(logits, y, reduction="none") if loss is None else loss(logits, y)
                # A misclassifying example beats any correctly classified one, whatever its loss.
                score = score + (logits.argmax(1) != y).to(score.dtype) * 1e6
                better = score > best_score
                best[better] = (x + delta)[better]
                best_score = torch.where(better, score, best_score)
        return best.detach()


def fgsm(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: Norm = "linf", mode: Mode = "eval") -> Tensor:
    """Fast gradient sign method (Goodfellow et al., 2015): one step of size ``eps`` from ``x``.

    Same contract as :func:`pgd` (inputs in [0, 1], output within eps and in [0, 1]).
    """
    return pgd(model, x, y, eps=eps, alpha=eps, steps=1, norm=norm, random_start=False, mode=mode)


def fgsm_rs(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    alpha: float | None = None,
    norm: Norm = "linf",
    mode: Mode = "eval",
    generator: torch.Generator | None = None,
) -> Tensor:
    """FGSM from a random start, the 'fast is better than free' recipe (Wong et al., 2020).

    One step of size ``alpha`` (default ``1.25 * eps``) from a uniform point in the eps ball, projected
    back. Same contract as :func:`pgd`.
    """
    step = 1.25 * eps if alpha is None else alpha
    return pgd(model, x, y, eps=eps, alpha=step, steps=1, norm=norm, random_start=True, mode=mode, generator=generator)


@dataclass
class AttackConfig:
    """The settings of one PGD attack, as used for training or for evaluation.

    ``steps=1, random_start=False, alpha=eps`` is FGSM; ``steps=1, random_start=True, alpha=1.25*eps`` is
    FGSM with random start (Fast-AT).

    Args:
        eps: threat-model radius in pixel units (inputs in [0, 1]); 0 disables the attack.
        alpha: step size in pixel units.
        steps: PGD steps.
        norm: ``"linf"`` or ``"l2"``.
        random_start: start from a random point in the eps ball.
        restarts: random restarts; the strongest example per sample is kept.
        mode: model mode during the attack, see :func:`model_mode`.
        loss: what each step maximises: ``"ce"``, the cross-entropy, or ``"margin"``, the largest wrong logit
            minus the true one (:func:`margin_loss`). Same cost; the margin is closer to AutoAttack's targeted
            stage on a model with low-confidence outputs, where the cross-entropy can overrate robustness (a
            validation attack that picks checkpoints). A training objective's own attack loss (TRADES) replaces
            it, so that objective refuses ``"margin"``.

    Raises:
        ValueError: as :func:`pgd`, and for a ``loss`` other than ``"ce"`` or ``"margin"``, at construction time.
    """

    eps: Pixels = 0.1  # L-inf or L2 radius, pixels; "8/255" is read as a fraction
    alpha: Pixels = 0.025  # step size, pixels
    steps: int = 10
    norm: Norm = "linf"
    random_start: bool = True
    restarts: int = 1
    mode: Mode = "eval"
    loss: AttackLoss = "ce"

    def __post_init__(self) -> None:
        self.eps, self.alpha = plain_pixels(self.eps), plain_pixels(self.alpha)
        _check_attack_args(self.eps, self.alpha, self.steps, self.norm, self.restarts)
        check_choice("mode", self.mode, MODES)
        check_choice("loss", self.loss, ATTACK_LOSSES)

    @property
    def enabled(self) -> bool:
        return self.eps > 0

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None,
                 loss: Callable[[Tensor, Tensor], Tensor] | None = None, start_std: float | None = None) -> Tensor:
        """:func:`pgd` with these settings; ``loss`` and ``start_std`` as there (set by a training objective)."""
        self.check_batch(x, y)
        return _pgd_loop(model, x, y, self, generator, loss, start_std, check_logits=True)

    def unchecked(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None,
                  loss: Callable[[Tensor, Tensor], Tensor] | None = None, start_std: float | None = None) -> Tensor:
        """As calling the attack, but without :meth:`check_batch` and the output-shape check: the same numbers.

        Those checks read the batch and the logits on the host (a device sync each). The training step calls
        this: the settings were checked when built, and the module checks the first batch and the model's output.
        """
        return _pgd_loop(model, x, y, self, generator, loss, start_std)

    def scaled(self, factor: float) -> AttackConfig:
        """This attack with ``eps`` and ``alpha`` times ``factor`` (a radius warm-up keeps the step size in
        proportion to the ball); itself when ``factor`` is 1."""
        return self if factor == 1 else replace(self, eps=self.eps * factor, alpha=self.alpha * factor)

    def check_batch(self, x: Tensor, y: Tensor) -> None:
        """The checks :func:`pgd` runs on a batch: finite pixels in [0, 1], integer labels, an L2 ball that fits.

        Raises:
            ValueError: as :func:`pgd` for its inputs.
        """
        _check_inputs(x, y, self.eps, self.norm)

    def describe(self) -> str:
        loss = "" if self.loss == "ce" else f" loss={self.loss}"
        return f"PGD-{self.steps} {self.norm} eps={self.eps:g} alpha={self.alpha:g} restarts={self.restarts}{loss}"
