"""Selection across DDP ranks: each rank picks its own top ``P_up`` or all ranks agree on one threshold.

Two scopes (the module's ``selection_scope``):

* ``"local"`` (default): each rank keeps the top ``P_up`` of its own pool and averages the loss over its own
  selected rows. With equal batch sizes per rank (what Lightning's ``DistributedSampler`` gives) every rank
  selects the same number of rows, so DDP's gradient average is the mean over all selected rows.
* ``"global"``: the per-sample scores of every rank are all-gathered and the top ``P_up`` of the *global*
  pool is selected (ties broken by rank, then by row, so every rank computes the same set). Each rank
  backpropagates its own rows of that set, with the summed loss scaled by ``world_size / k_global``
  (:func:`global_loss_scale`): after DDP divides the summed gradients by ``world_size``, the update equals
  a single-process step on the concatenated batch. Ranks may select different numbers of rows, none
  included.

Every function here takes the Lightning strategy, so the same code runs with gloo on CPU and NCCL on GPU.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch
from torch import Tensor

from lightning_advsel import selection

Scope = Literal["local", "global"]
SCOPES: tuple[str, ...] = get_args(Scope)


def world_size(strategy: Any) -> int:
    """Processes taking part in training (1 for single-device strategies)."""
    return int(getattr(strategy, "world_size", 1))


def _gather(strategy: Any, tensor: Tensor) -> Tensor:
    """All-gather ``tensor`` into shape ``(world_size, *tensor.shape)``, also with a single process."""
    if world_size(strategy) == 1:
        return tensor.unsqueeze(0)
    return strategy.all_gather(tensor).reshape(world_size(strategy), *tensor.shape)


def sum_over_ranks(strategy: Any, tensor: Tensor) -> Tensor:
    """``tensor`` summed over all ranks, in place: one all-reduce (the tensor itself with a single process).

    Lightning's ``strategy.reduce`` puts a barrier before each all-reduce; the all-reduce alone already waits
    for every rank, so the per-step checks of the training step call this instead.
    """
    if world_size(strategy) == 1:
        return tensor
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def settle_logged_values(trainer: Any) -> None:
    """Compute, on every rank and now, the values logged so far that Lightning would sync later.

    Lightning computes a logged torchmetrics object, and a value logged with ``sync_dist``, when the trainer's
    metrics are first read, and that computation is a collective. Rank 0's progress bar reads them at an epoch's
    end, before the LightningModule's epoch-end hook; the other ranks, which draw no bar, read them only when
    Lightning logs the epoch. A collective of our own in between (a counter's ``compute``, a gather) would pair
    with a different one on each rank. Called before such a collective, this reads the metrics on every rank,
    so Lightning's syncs come first everywhere; computed values are cached, so no later read syncs them again,
    and reading them early changes no value. Any rank-zero-only reader (a user's callback) is covered the same
    way. Nothing with a single process.
    """
    if world_size(trainer.strategy) > 1:
        _ = trainer.callback_metrics  # the property computes (and caches) every value logged so far


def log_rank_wide(module: Any, values: dict[str, float]) -> None:
    """Log epoch values that are already the same on every rank (computed from counts summed over ranks).

    Lightning asks for ``sync_dist`` on every epoch-level value under DDP (it warns otherwise); a maximum over
    ranks of equal numbers is each of them exactly, where a mean over three or more ranks could round.
    """
    module.log_dict(values, on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max")


def average_grads_over_ranks(strategy: Any, params: list[Tensor]) -> None:
    """Replace each parameter's gradient by its mean over ranks, as DDP's own all-reduce would (one all-reduce of
    the flattened gradients; a parameter without a gradient counts as zeros). Nothing with a single process."""
    n = world_size(strategy)
    if n == 1 or not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    flat /= n
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def broadcast_buffers(strategy: Any, module: torch.nn.Module) -> None:
    """Rank 0's buffers of ``module`` (BatchNorm's running statistics) on every rank, in place.

    DDP broadcasts them at a forward after a synced training forward, but under Lightning's manual optimization
    its post-forward never records one (Lightning turns the reducer off around the forward and prepares it in
    ``manual_backward``), so each rank's running statistics follow its own batches only. Nothing with a single
    process or when the DDP wrapper was built with ``broadcast_buffers=False``.
    """
    if world_size(strategy) == 1 or not getattr(getattr(strategy, "model", None), "broadcast_buffers", True):
        return
    for buffer in module.buffers():
        torch.distributed.broadcast(buffer, src=0)


def global_pool_size(strategy: Any, local_size: int, device: torch.device) -> tuple[Tensor, int]:
    """Pool sizes of every rank (shape ``(world_size,)``) and their sum."""
    sizes = _gather(strategy, torch.tensor([local_size], device=device)).reshape(-1)
    return sizes, int(sizes.sum())


def global_top_k(strategy: Any, scores: Tensor, k: int, sizes: Tensor) -> Tensor:
    """Indices into this rank's pool of its rows among the ``k`` highest scores over all ranks.

    Pools may differ in size between ranks; shorter ones are padded with ``-inf`` before the all-gather and
    padding is never selected. Equal scores are ordered by rank, then by row, so all ranks agree.

    Args:
        strategy: the Lightning strategy (``trainer.strategy``).
        scores: this rank's per-sample scores, shape ``(P_local,)``; higher means "backpropagate first".
        k: how many rows to select over all ranks.
        sizes: pool size of every rank, from :func:`global_pool_size`.

    Returns:
        Ascending indices into this rank's pool (possibly empty).
    """
    width = int(sizes.max())
    padded = torch.full((width,), -torch.inf, device=scores.device, dtype=torch.float32)
    padded[: scores.numel()] = scores.detach().float()
    table = _gather(strategy, padded)  # (world_size, width)
    valid = torch.arange(width, device=scores.device).unsqueeze(0) < sizes.to(scores.device).unsqueeze(1)
    flat = torch.where(valid, table, torch.full_like(table, -torch.inf)).reshape(-1)
    # Stable sort of the negated scores: ties keep rank-major, row-minor order. Padding sorts last, and
    # never reaches the first k because k is at most the number of valid rows.
    order = torch.sort(-flat, stable=True).indices[:k]
    mine = order[order // width == strategy.global_rank] % width
    return mine.sort().values


def global_loss_scale(strategy: Any, k_global: int) -> float:
    """Factor on the summed per-row loss so that DDP's averaged gradient is the mean over ``k_global`` rows."""
    return world_size(strategy) / max(k_global, 1)


def global_selection(strategy: Any, pool_size: int, p_up: float, device: torch.device,
                     scores_fn: Any) -> tuple[Tensor, Tensor | None, int]:
    """Select this rank's rows under the global scope.

    Args:
        strategy: the Lightning strategy.
        pool_size: rows in this rank's pool.
        p_up: fraction of the global pool to backpropagate.
        device: device of the pool.
        scores_fn: called with no arguments to score this rank's pool when a selection is needed.

    Returns:
        ``(selected, scores, k_global)``: ascending indices into this rank's pool, the local scores
        (``None`` when everything is selected and no scoring ran), and the global number of selected rows.
    """
    sizes, total = global_pool_size(strategy, pool_size, device)
    k_global = selection.fraction_count(total, p_up)
    if k_global == total:
        return torch.arange(pool_size, device=device), None, k_global
    scores = scores_fn()
    return global_top_k(strategy, scores, k_global, sizes), scores, k_global
