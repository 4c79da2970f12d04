"""Which samples are attacked and which are backpropagated: small strategies over per-sample scores.

Two stages use this file:

* **After the attack** (the data-selection rule, Algorithm 1 of the DS paper): a pool of clean and
  adversarial samples is scored by per-sample cross-entropy (eq. 7-8) and the top ``P_up`` fraction is
  backpropagated (:func:`top_k`), or a uniformly random ``P_up`` fraction (:func:`random_k`, the paper's
  random-robust baseline).
* **Before the attack** (selective adversarial training): every sample of the clean batch gets a score
  from one no-grad forward pass and only the first ``attack_frac`` of the batch in score order is attacked.
  The scores are registered in :data:`PRE_ATTACK_SCORES`, each with the order it selects in (the smallest
  margin first, the highest cosine or loss first), so the logged values are the scores themselves.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from lightning_advsel.attacks import margin_loss, model_mode


def fraction_count(n: int, fraction: float) -> int:
    """How many of ``n`` samples a ``fraction`` keeps: rounded half up, at least one when ``n > 0``."""
    if n == 0:
        return 0
    return min(n, max(1, math.floor(fraction * n + 0.5)))


def top_k(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest scores (the data-selection rule), in ascending index order."""
    if k >= scores.numel():
        return torch.arange(scores.numel(), device=scores.device)
    return torch.topk(scores, k, sorted=False).indices.sort().values


def mask_indices(mask: Tensor, count: int) -> Tensor:
    """Ascending indices of the True (nonzero) entries of the 1-D ``mask`` (bool, or uint8 of 0 and 1), of which
    there are ``count``: what ``mask.nonzero().flatten()`` returns, without reading the device (``nonzero`` waits
    for the device to learn its output's size; a stable sort that puts the True entries first is told it)."""
    if count == mask.numel():
        return torch.arange(count, device=mask.device)
    return torch.argsort(mask.to(torch.uint8), descending=True, stable=True)[:count]


def random_k(n: int, k: int, *, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """``k`` of ``n`` indices drawn uniformly without replacement, in ascending order."""
    if k >= n:
        return torch.arange(n, device=device)
    return torch.randperm(n, generator=generator, device=device)[:k].sort().values


def per_sample_loss(logits: Tensor, y: Tensor) -> Tensor:
    """The DS paper's error signal (eq. 7-8): per-sample cross-entropy."""
    return F.cross_entropy(logits.float(), y, reduction="none")


@dataclass
class ScoringPass:
    """What one no-grad forward pass over the clean batch produced, handed to a pre-attack score.

    Attributes:
        model: the network (in the mode the scoring pass ran in).
        x: clean inputs in [0, 1].
        y: labels.
        logits: the model's logits for ``x``.
        features: inputs of the model's last ``nn.Linear`` (penultimate features) when the score asked
            for them, else ``None``.
        generator: random generator of this training step.
    """

    model: nn.Module
    x: Tensor
    y: Tensor
    logits: Tensor
    features: Tensor | None = None
    generator: torch.Generator | None = None


def margin_score(p: ScoringPass) -> Tensor:
    """Gap between the two largest logits; the smallest gap (nearest the decision boundary) is attacked first."""
    top2 = p.logits.float().topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def margin_true_score(p: ScoringPass) -> Tensor:
    """True-class logit minus the largest other logit (negative when misclassified); the smallest is attacked first.

    Unlike :func:`margin_score` it reads the label: a confidently misclassified sample scores lowest.
    """
    return -margin_loss(p.logits.float(), p.y)


def loss_score(p: ScoringPass) -> Tensor:
    """Clean cross-entropy: the hardest clean samples score highest."""
    return per_sample_loss(p.logits, p.y)


def uniform_scores(n: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """``n`` scores drawn uniformly from [0, 1): the top k of them is a uniformly random subset."""
    return torch.rand(n, generator=generator, device=device)


def random_score(p: ScoringPass) -> Tensor:
    """Uniform noise: a random subset is attacked (baseline)."""
    return uniform_scores(p.y.shape[0], p.y.device, p.generator)


def _cosine_to_mean(dots: Tensor, sq_norms: Tensor, mean_sq_norm: Tensor) -> Tensor:
    """Cosine of each per-sample gradient g_i with the batch mean G, from <g_i, G>, |g_i|^2 and |G|^2."""
    return dots / (sq_norms.sqrt() * mean_sq_norm.sqrt()).clamp_min(1e-12)


def gradmatch_score(p: ScoringPass) -> Tensor:
    """Cosine of each sample's last-layer loss gradient with the batch-mean gradient (closed form).

    For cross-entropy, the gradient of sample ``i``'s loss with respect to the final ``nn.Linear`` (weight and
    bias) is ``r_i (x) [h_i, 1]`` with ``r_i = softmax(z_i) - onehot(y_i)`` and ``h_i`` the penultimate
    features, so no backward pass is needed. Inner products of two such gradients factor as
    ``(r_i . r_j) ([h_i, 1] . [h_j, 1])``: the scores come from two ``(B, B)`` Gram matrices, never from a
    ``(B, C * D)`` tensor of flattened gradients. The highest cosine is attacked first.
    """
    if p.features is None:
        raise ValueError("`gradmatch` needs the penultimate features (the input of the final nn.Linear)")
    r = p.logits.float().softmax(dim=1)
    r[torch.arange(r.shape[0], device=r.device), p.y] -= 1
    h = p.features.float().flatten(1)
    gram = (r @ r.T) * (h @ h.T + 1)
    return _cosine_to_mean(gram.mean(dim=1), gram.diagonal(), gram.mean())


def gradmatch_exact_score(p: ScoringPass) -> Tensor:
    """Cosine of each sample's loss gradient over *all* parameters with the batch-mean gradient.

    Per-sample gradients come from ``torch.func.vmap(torch.func.grad(...))`` over
    :func:`torch.func.functional_call`: one extra forward and backward of the whole batch, and memory for
    ``B`` copies of every parameter's gradient (one parameter tensor at a time). Expensive: meant for small
    models and for checking the closed-form :func:`gradmatch_score`. Works on any model (it needs no final
    ``nn.Linear``). The model runs in eval mode here, so BatchNorm uses its running statistics (a gradient
    under batch statistics is not a per-sample quantity) and dropout is off.
    """
    params = {k: v.detach() for k, v in p.model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in p.model.named_buffers()}

    def loss(prm: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = functional_call(p.model, (prm, buffers), (x.unsqueeze(0),))
        return F.cross_entropy(logits, y.unsqueeze(0))

    with torch.enable_grad(), model_mode(p.model, "eval"):
        grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, p.x, p.y)
    n = p.x.shape[0]
    dots = p.x.new_zeros(n, dtype=torch.float32)
    sq_norms = torch.zeros_like(dots)
    mean_sq_norm = dots.new_zeros(())
    for g in grads.values():
        g = g.float().reshape(n, -1)
        mean = g.mean(dim=0)
        dots += g @ mean
        sq_norms += g.pow(2).sum(dim=1)
        mean_sq_norm += mean.pow(2).sum()
    return _cosine_to_mean(dots, sq_norms, mean_sq_norm)


@dataclass(frozen=True)
class PreAttackScore:
    """A named pre-attack score.

    Attributes:
        fn: the per-sample score of the clean batch, shape ``(B,)``.
        needs_features: the scoring pass must capture the input of the final ``nn.Linear``.
        higher_first: the highest scores are attacked first (else the lowest).
    """

    fn: Callable[[ScoringPass], Tensor]
    needs_features: bool = False
    higher_first: bool = True

    def pick(self, scores: Tensor, k: int) -> Tensor:
        """Indices of the ``k`` samples to attack first, in ascending index order."""
        return top_k(scores if self.higher_first else -scores, k)

    def sample(self, scores: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """``k`` indices drawn without replacement with probability proportional to ``1 / |score|`` (margins:
        the nearer the boundary, the likelier), in ascending index order."""
        weights = 1.0 / scores.float().abs().clamp_min(1e-6)
        return torch.multinomial(weights, k, replacement=False, generator=generator).sort().values


AttackScore = Literal["margin", "margin_true", "gradmatch", "gradmatch_exact", "loss", "random"]
AttackSampling = Literal["top", "proportional"]
ATTACK_SAMPLINGS = get_args(AttackSampling)

# Keyed in the order of `AttackScore`; tests/test_checks.py holds the two together.
PRE_ATTACK_SCORES: dict[str, PreAttackScore] = {
    "margin": PreAttackScore(margin_score, higher_first=False),
    "margin_true": PreAttackScore(margin_true_score, higher_first=False),
    "gradmatch": PreAttackScore(gradmatch_score, needs_features=True),
    "gradmatch_exact": PreAttackScore(gradmatch_exact_score),
    "loss": PreAttackScore(loss_score),
    "random": PreAttackScore(random_score),
}


def last_linear(model: nn.Module, who: str = "this score") -> nn.Linear:
    """The last ``nn.Linear`` registered in ``model``, taken as its classification head.

    Args:
        model: the classifier.
        who: what needs the layer, named in the error (e.g. ``"`attack_score`='gradmatch'"``).

    Raises:
        ValueError: if the model has no ``nn.Linear``.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            f"{who} needs a model whose final layer is an `nn.Linear` (its input is the penultimate feature "
            f"vector), got {type(model).__name__} with no `nn.Linear`; use 'gradmatch_exact' (per-sample "
            f"gradients of all parameters, expensive) or 'margin' for such models"
        )
    return linears[-1]


def scoring_pass(model: nn.Module, x: Tensor, y: Tensor, mode: str, generator: torch.Generator | None = None, *,
                 features: bool = False, who: str = "this score") -> ScoringPass:
    """One no-grad forward pass over the clean batch, in model mode ``mode``, for a pre-attack score.

    Args:
        model: the classifier.
        x: clean inputs in [0, 1].
        y: labels.
        mode: model mode of the pass (:func:`~lightning_advsel.attacks.model_mode`).
        generator: the step's random generator, handed to the score.
        features: also capture the input of the model's last ``nn.Linear`` (the closed-form gradient match).
        who: what asked for the features, named in errors.

    Raises:
        ValueError: with ``features``, for a model without an ``nn.Linear`` or whose logits are not the output
            of its last ``nn.Linear`` (it ran more than once, or something follows it).
    """
    captured: list[Tensor] = []
    head_out: list[Tensor] = []
    handle = None
    if features:
        head = last_linear(model, who=who)

        def keep(_m: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
            captured.append(inputs[0].detach())
            head_out.append(out)

        handle = head.register_forward_hook(keep)
    try:
        with torch.no_grad(), model_mode(model, mode):
            logits = model(x)
    finally:
        if handle is not None:
            handle.remove()
    if features and (len(head_out) != 1 or head_out[0] is not logits):
        # The closed form is the gradient of the head's weights only if the head's output is the logits.
        raise ValueError(
            f"{who} takes the last nn.Linear of `model` ({type(head).__name__}({head.in_features}, "
            f"{head.out_features})) as its output layer, but the model's logits are not that layer's output (it "
            f"ran {len(head_out)} times, or something follows it); use 'gradmatch_exact' or 'margin' for this model"
        )
    return ScoringPass(model, x, y, logits, captured[0] if captured else None, generator)
