"""PGD compiled into one graph: the attack as a pure function of tensors, and a cache that compiles it per shape.

On a fast GPU a PGD step of a small network is bound by the host: every one of its steps dispatches the
network's forward and input-gradient backward kernel by kernel (some 3,600 launches for a ResNet-18 training step
with PGD-10). Compiled into one graph, replayed as a CUDA graph, the attack is a few launches a step.

* :func:`pgd_graph` is PGD (Madry et al., 2018, arXiv:1706.06083) as a pure function of tensors: the network's
  parameters and buffers as dicts, the inputs, the labels, the random starts (drawn outside, from the step's own
  generator, so a resumed run draws the same), and ``eps`` / ``alpha`` as 0-d tensors (a radius warm-up changes
  them every batch without a new graph). The input gradient is ``torch.func.grad`` over
  ``torch.func.functional_call``: ``torch.autograd.grad`` breaks a dynamo graph (torch 2.14:
  ``trace_autograd_ops`` is off). :func:`pgd_step_graph` is one of its steps, for a graph replayed ``steps``
  times (a shorter compilation).
* :class:`CompiledPGD` runs either under ``torch.compile(fullgraph=True, dynamic=False)``, compiles once per
  shape, dtype, device, precision and model mode, counts what it compiled, and runs a batch it may not compile
  eagerly (:func:`~lightning_advsel.step.eager_attack`, the reference), saying why once.

Inputs are pixels in [0, 1] (normalization inside the model, so ``eps`` and ``alpha`` are in pixel units),
shape ``(B, C, H, W)`` or ``(B, D)``; labels ``(B,)``; the result has the shape of the inputs, within ``eps`` of
them and in [0, 1], detached. Parameters and buffers enter detached: the attack never touches a parameter's
``.grad``, so no DistributedDataParallel hook fires inside it, and the training backward stays the caller's.

BatchNorm: ``torch.func`` refuses the in-place update of running statistics, so the attack runs with tracking off
(:func:`~lightning_advsel.attacks.model_mode` ``"train"`` does that for torch's BatchNorm: batch statistics,
buffers untouched) or in ``"eval"`` mode. A BatchNorm with a forward of its own, SyncBatchNorm, and the
``"keep"`` mode on a training BatchNorm stay eager (:func:`eager_reason`).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.func import functional_call, grad
from torch.nn.modules.batchnorm import _BatchNorm
from torch.torch_version import TorchVersion
from torch.utils import _python_dispatch

from lightning_advsel.attacks import (
    _TORCH_BATCHNORM_FORWARDS,
    AttackConfig,
    _project,
    ascend,
    attack_precision,
    draw_start,
    margin_loss,
    model_mode,
)
from lightning_advsel.checks import check_choice, check_int
from lightning_advsel.objectives import Objective, kl_rows
from lightning_advsel.step import eager_attack

# torch.func.grad inside a dynamo graph is tested on 2.14 (this project's CPU machine). The GPU machines run 2.11,
# which could not be installed here: it is let through with a warning, and benchmarks/gpu_speed.py checks the
# compiled attack's loss against the eager one's before it times anything. Older releases are refused.
OLDEST_TORCH = (2, 11)
TESTED_TORCH = (2, 14)
Graph = Literal["loop", "step"]
GRAPHS: tuple[str, ...] = get_args(Graph)
AttackValue = Literal["ce", "margin", "kl"]
# Recompilations allowed on pgd_graph's code while this package calls it: above torch's default of 8, which
# every CompiledPGD in the process shares (dynamo counts per function), with each instance's own bound below it.
RECOMPILE_LIMIT = 64


def check_torch(version: str | None = None) -> None:
    """Refuse a torch release older than :data:`OLDEST_TORCH`; warn on one older than :data:`TESTED_TORCH`.

    Raises:
        RuntimeError: naming the installed release, the oldest one accepted and what to do.
    """
    found = TorchVersion(version or torch.__version__)
    oldest, tested = ".".join(map(str, OLDEST_TORCH)), ".".join(map(str, TESTED_TORCH))
    if found < OLDEST_TORCH:
        raise RuntimeError(f"`compile_attack` needs torch >= {oldest} (torch.func.grad inside a compiled graph), "
                           f"found {found}: upgrade torch, or leave `compile_attack` off")
    if found < TESTED_TORCH:
        rank_zero_info(f"compile_attack: torch {found} is older than {tested}, the release the compiled attack was "
                       f"tested against on CPU; compare it with the eager attack (benchmarks/gpu_speed.py does)")


def under_dispatch_mode() -> bool:
    """Whether a ``TorchDispatchMode`` is active that dynamo compiles nothing under (a ``FlopCounterMode``, a memory
    or operator counter): a compiled call would then skip its frame, and ``fullgraph=True`` raise."""
    for name in ("any_torch_dispatch_mode_on_stack", "is_in_any_mode_without_ignore_compile_internals"):
        check = getattr(_python_dispatch, name, None)  # the first: torch >= 2.14; the second: the releases before
        if callable(check):
            return check()
    return _python_dispatch._get_current_dispatch_mode() is not None


def attack_values(logits: Tensor, y: Tensor, loss: AttackValue, reference: Tensor | None = None) -> Tensor:
    """What PGD maximises, per row ``(B,)``: the cross-entropy, the margin (:func:`margin_loss`), or TRADES's KL
    divergence from the clean logits ``reference`` to ``logits``."""
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if loss == "margin":
        return margin_loss(logits, y)
    return kl_rows(reference, logits)


def _input_gradient(model: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, y: Tensor,
                    loss: AttackValue, reference: Tensor | None) -> Callable[[Tensor], Tensor]:
    """``delta -> d(sum of attack_values at x + delta) / d delta``, with the network as a function of its state."""

    def summed(delta: Tensor) -> Tensor:
        logits = functional_call(model, (params, buffers), (x + delta,))
        if loss == "ce":  # summed inside the kernel, as the eager attack does
            return F.cross_entropy(logits, y, reduction="sum")
        return attack_values(logits, y, loss, reference).sum()

    return grad(summed)


def _keep_stronger(best: Tensor, best_score: Tensor, x_adv: Tensor, logits: Tensor, y: Tensor, loss: AttackValue,
                   reference: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per row, the restart's example if it beats the best so far: a misclassifying example beats any correctly
    classified one, then the higher attack loss wins (as the eager attack; ``torch.where``, no boolean indexing)."""
    score = attack_values(logits, y, loss, reference)
    score = score + (logits.argmax(1) != y).to(score.dtype) * 1e6
    better = score > best_score
    return torch.where(better.view(-1, *[1] * (x_adv.dim() - 1)), x_adv, best), torch.where(better, score, best_score)


def pgd_graph(model: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, y: Tensor,
              starts: Tensor, eps: Tensor, alpha: Tensor, reference: Tensor | None = None, *, steps: int,
              norm: str = "linf", loss: AttackValue = "ce") -> Tensor:
    """Projected gradient descent (Madry et al., 2018, arXiv:1706.06083) as a pure function of tensors.

    What :func:`~lightning_advsel.attacks.pgd` computes, in a form ``torch.compile(fullgraph=True)`` takes whole:
    no random draw, no Python number that changes between batches, no host read. The model's mode is the
    caller's (:func:`~lightning_advsel.attacks.model_mode`; BatchNorm tracking must be off in training mode).

    Args:
        model: classifier on pixels in [0, 1], logits ``(B, K)``; called through ``functional_call``.
        params: the model's parameters by name, detached.
        buffers: the model's buffers by name, detached.
        x: clean inputs in [0, 1], shape ``(B, C, H, W)`` or ``(B, D)``.
        y: integer labels, shape ``(B,)``.
        starts: one start perturbation per restart, ``(R, *x.shape)``, unprojected
            (:func:`~lightning_advsel.attacks.draw_start`).
        eps: L-inf or L2 radius in pixels, a 0-d tensor.
        alpha: step size in pixels, a 0-d tensor.
        reference: clean logits ``(B, K)`` for ``loss="kl"`` (TRADES), else ``None``.
        steps: gradient steps per restart.
        norm: ``"linf"`` or ``"l2"``.
        loss: ``"ce"``, ``"margin"`` or ``"kl"`` (:func:`attack_values`).

    Returns:
        Adversarial inputs of the shape of ``x``, within ``eps`` of ``x`` and in [0, 1]; with ``R > 1`` restarts,
        per row the strongest (a misclassifying one first, then the highest loss).
    """
    gradient = _input_gradient(model, params, buffers, x, y, loss, reference)
    best, best_score = x, torch.full((x.shape[0],), float("-inf"), device=x.device)
    for r in range(starts.shape[0]):
        delta = _project(starts[r], x, eps, norm)
        for _ in range(steps):
            delta = ascend(delta, gradient(delta), x, eps, alpha, norm)
        if starts.shape[0] == 1:
            return x + delta
        with torch.no_grad():
            logits = functional_call(model, (params, buffers), (x + delta,))
        best, best_score = _keep_stronger(best, best_score, x + delta, logits, y, loss, reference)
    return best


def pgd_step_graph(model: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, y: Tensor,
                   delta: Tensor, eps: Tensor, alpha: Tensor, reference: Tensor | None = None, *, norm: str = "linf",
                   loss: AttackValue = "ce") -> Tensor:
    """One step of :func:`pgd_graph` from the projected perturbation ``delta`` (shape of ``x``): the next one. A
    graph of one step, replayed ``steps`` times, compiles in a fraction of the whole loop's time."""
    return ascend(delta, _input_gradient(model, params, buffers, x, y, loss, reference)(delta), x, eps, alpha, norm)


def eager_reason(model: nn.Module, mode: str) -> str | None:
    """Why the attack on ``model`` in model ``mode`` cannot be one ``torch.func`` graph, ``None`` if it can."""
    training = mode == "train" or (mode == "keep" and model.training)
    for name, m in model.named_modules():
        if isinstance(m, nn.SyncBatchNorm):
            return f"SyncBatchNorm ({name}) reduces its statistics over the ranks inside the forward"
        if not (training and isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None):
            continue
        if mode == "keep":
            return (f"mode 'keep' leaves the training BatchNorm {name} updating its running statistics in place, "
                    f"which torch.func refuses; use mode 'train'")
        if type(m).forward not in _TORCH_BATCHNORM_FORWARDS:
            return (f"the BatchNorm {name} ({type(m).__name__}) has a forward of its own, which updates its running "
                    f"statistics in place; torch.func refuses that")
    return None


class CompiledPGD:
    """The training (or evaluation) PGD attack compiled once per shape: a :class:`~lightning_advsel.step.Attacker`.

    Each call draws the restarts' starts from ``generator`` exactly as the eager attack does, writes ``eps`` and
    ``alpha`` into 0-d tensors on the batch's device (in place: a radius warm-up is no new graph), and runs
    :func:`pgd_graph` (``graph="loop"``) or :func:`pgd_step_graph` ``steps`` times (``graph="step"``) under
    ``torch.compile(fullgraph=True, dynamic=False)``, in the attack's model mode and precision
    (:func:`~lightning_advsel.attacks.attack_precision`). A new shape, dtype, device, precision, model structure or
    mode is a new graph, up to ``max_graphs``; a batch past that, or an attack that cannot be one graph
    (:func:`eager_reason`), runs the eager attack and says why, once per reason (``rank_zero_info``). Torch's own
    recompilation limit, past which it would run the function eagerly without a word, is raised to
    :data:`RECOMPILE_LIMIT` during the call and made an error, so that it never decides in silence.

    One instance serves any number of models: a graph is keyed by the model's structure, not its identity, so a
    wrapper built on each access (``nn.Sequential(normalize, model)``) reuses the graph of the first.

    Args:
        backend: ``torch.compile``'s backend: ``"inductor"`` (default), or a cheaper one for tests (``"aot_eager"``,
            or a ``torch._dynamo.testing.CompileCounterWithBackend``).
        mode: ``torch.compile``'s mode with ``"inductor"``; ``"reduce-overhead"`` replays the graph as a CUDA graph
            (the output is then copied before it is returned, since a replay reuses its buffers).
        graph: ``"step"`` (default), one PGD step replayed ``steps`` times (on a GPU ``steps`` CUDA graph launches,
            and a compilation a fraction of the loop's), or ``"loop"``, the whole attack as one graph.
        max_graphs: graphs this instance compiles at most (>= 1).

    Attributes:
        compile_seconds: by graph key, the seconds of the call that compiled it (its one run included).
        eager_calls: calls that ran the eager attack.
        graph_calls: calls of a compiled graph (one a batch with ``"loop"``, ``steps`` with ``"step"``); each is one
            launch when replayed as a CUDA graph.
        graph_context: a context manager factory each compiled graph's call runs in (``nullcontext``); a counter of
            dispatched operators pauses there (``benchmarks/host_work.py``), since dynamo compiles nothing under a
            dispatch mode and the attack would run eagerly.

    Raises:
        ValueError: for an unknown ``graph``, ``max_graphs`` below 1, or a ``mode`` with a backend other than
            ``"inductor"``.
        RuntimeError: on a torch release older than :data:`OLDEST_TORCH`.
    """

    def __init__(self, backend: str | Callable = "inductor", mode: str | None = None, graph: Graph = "step",
                 max_graphs: int = 8) -> None:
        check_torch()
        check_choice("graph", graph, GRAPHS)
        self.max_graphs = check_int("max_graphs", max_graphs, 1)
        if mode is not None and backend != "inductor":
            raise ValueError(f"`mode` is an option of the 'inductor' backend, got mode {mode!r} with backend "
                             f"{backend!r}")
        options: dict[str, Any] = {"mode": mode} if mode is not None else {}
        self.graph, self.mode = graph, mode
        self.cudagraphs = mode in ("reduce-overhead", "max-autotune")
        target = pgd_graph if graph == "loop" else pgd_step_graph
        self._compiled = torch.compile(target, fullgraph=True, dynamic=False, backend=backend, **options)
        self.compile_seconds: dict[tuple, float] = {}
        self.eager_calls = self.graph_calls = 0
        self.graph_context: Callable[[], AbstractContextManager] = nullcontext
        self._said: set[str] = set()
        self._radius: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor, list[float]]] = {}
        # By model, weakly: a wrapper built on each access leaves with its step.
        self._states: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()

    @property
    def compilations(self) -> int:
        """Graphs compiled so far."""
        return len(self.compile_seconds)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, attack: AttackConfig,
                 generator: torch.Generator | None = None, objective: Objective | None = None) -> Tensor:
        """``attack`` on ``(x, y)`` maximising ``objective``'s attack loss (default: the attack's own), detached;
        the examples of :func:`~lightning_advsel.step.eager_attack` from the same ``generator`` state, up to the
        order of floating-point sums. Unchecked, as that: check a batch once with ``attack.check_batch``."""
        objective = objective or Objective()
        if not x.shape[0]:  # nothing to attack: no graph for it
            return eager_attack(model, x, y, attack, generator, objective)
        reason = eager_reason(model, attack.mode)
        key, state = None, None
        if reason is None:
            state = self._state(model)
            key = self._key(model, state[0], x, attack, objective)
            if key not in self.compile_seconds and self.compilations >= self.max_graphs:
                reason = (f"`max_graphs`={self.max_graphs} graphs are compiled already; this batch of "
                          f"{tuple(x.shape)} runs eagerly")
            with self.graph_context():
                if under_dispatch_mode():
                    mode = type(_python_dispatch._get_current_dispatch_mode()).__name__
                    reason = f"a TorchDispatchMode ({mode}) is active, and dynamo compiles nothing under one"
        if reason is not None:
            self._say(reason)
            self.eager_calls += 1
            return eager_attack(model, x, y, attack, generator, objective)
        # As the eager attack: TRADES's clean prediction in the caller's precision, then the attack in its own.
        reference = objective.attack_reference(model, x, attack.mode)
        loss: AttackValue = "kl" if reference is not None else attack.loss
        start_std = objective.start_std
        started = time.perf_counter()
        with (torch.inference_mode(False), torch.enable_grad(), attack_precision(x.device.type),
              model_mode(model, attack.mode)):
            x = x.detach().clone()  # a normal tensor under Lightning's inference mode
            y = y.detach().to(torch.long, copy=True)
            reference = None if reference is None else reference.detach().clone()
            starts = torch.stack([draw_start(x, attack, generator, start_std) for _ in range(attack.restarts)])
            eps, alpha = self._eps_alpha(x, attack)
            _, params, buffers = state
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
                out = self._run(model, params, buffers, x, y, starts, eps, alpha, reference, attack, loss)
        if key not in self.compile_seconds:
            self.compile_seconds[key] = time.perf_counter() - started
        # A CUDA graph's replay writes its output buffer again: the training forward gets a copy of its own.
        return out.clone() if self.cudagraphs else out.detach()

    def _run(self, model: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, y: Tensor,
             starts: Tensor, eps: Tensor, alpha: Tensor, reference: Tensor | None, attack: AttackConfig,
             loss: AttackValue) -> Tensor:
        if self.cudagraphs:  # a new step: the buffers of the previous one's replays may be reused
            torch.compiler.cudagraph_mark_step_begin()
        if self.graph == "loop":
            return self._graph(model, params, buffers, x, y, starts, eps, alpha, reference, steps=attack.steps,
                               norm=attack.norm, loss=loss)
        best, best_score = x, torch.full((x.shape[0],), float("-inf"), device=x.device)
        for start in starts:
            delta = _project(start, x, eps, attack.norm)
            for _ in range(attack.steps):
                delta = self._graph(model, params, buffers, x, y, delta, eps, alpha, reference, norm=attack.norm,
                                    loss=loss)
            if attack.restarts == 1:
                return x + delta
            with torch.no_grad():
                logits = model(x + delta)
            best, best_score = _keep_stronger(best, best_score, x + delta, logits, y, loss, reference)
        return best

    def _graph(self, *args: Any, **kwargs: Any) -> Tensor:
        """One call of the compiled graph, in :attr:`graph_context`."""
        self.graph_calls += 1
        with self.graph_context():
            return self._compiled(*args, **kwargs)

    def _key(self, model: nn.Module, signature: tuple, x: Tensor, attack: AttackConfig,
             objective: Objective) -> tuple:
        """What a compiled graph is specialised on: a change of any of it is a new graph. The model enters by its
        structure (class, and its tensors' names, shapes and dtypes), not its identity: dynamo's guards take a new
        module object of the same structure, such as a wrapper built on each access, as the same graph."""
        device = x.device.type
        precision = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        return (type(model), signature, tuple(x.shape), x.stride(), x.dtype, x.device, precision, attack.mode,
                model.training, attack.steps, attack.norm, attack.restarts,
                "kl" if objective.attacks_kl else attack.loss)

    def _eps_alpha(self, x: Tensor, attack: AttackConfig) -> tuple[Tensor, Tensor]:
        """``eps`` and ``alpha`` as 0-d tensors on ``x``'s device, written in place when they change (a fill
        kernel; no copy from the host, which would wait for the device)."""
        slot = (x.device, x.dtype)
        if slot not in self._radius:
            self._radius[slot] = (torch.zeros((), device=x.device, dtype=x.dtype),
                                  torch.zeros((), device=x.device, dtype=x.dtype), [float("nan"), float("nan")])
        eps, alpha, last = self._radius[slot]
        if last != [attack.eps, attack.alpha]:
            eps.fill_(attack.eps)
            alpha.fill_(attack.alpha)
            last[:] = [attack.eps, attack.alpha]
        return eps, alpha

    def _state(self, model: nn.Module) -> tuple[tuple, dict[str, Tensor], dict[str, Tensor]]:
        """The model's structure (its tensors' names, shapes and dtypes), and its parameters and buffers by name,
        detached (so that neither autograd nor a DDP hook sees the attack), made again only when a tensor was
        replaced (an optimizer updates them in place)."""
        named = [*model.named_parameters(), *model.named_buffers()]
        check = tuple((name, t.data_ptr(), t.dtype, t.shape) for name, t in named)
        cached = self._states.get(model)
        if cached is None or cached[0] != check:
            params = {name: p.detach() for name, p in model.named_parameters()}
            buffers = {name: b.detach() for name, b in model.named_buffers()}
            if self.cudagraphs:  # the same memory every step: a CUDA graph reads it in place instead of copying it
                for t in (*params.values(), *buffers.values()):
                    torch._dynamo.mark_static_address(t)
            cached = self._states[model] = (check, params, buffers)
        return tuple((name, dtype, shape) for name, _, dtype, shape in check), cached[1], cached[2]

    def _say(self, reason: str) -> None:
        if reason not in self._said:
            self._said.add(reason)
            rank_zero_info(f"compile_attack: the attack runs eagerly: {reason}")
