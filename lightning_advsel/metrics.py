"""Training-step metrics that never make the host wait for the device.

torchmetrics' :class:`~torchmetrics.MeanMetric` checks every update for NaN with a Python ``if`` on a device
tensor, and turns a Python number into a device tensor by a copy from the host: on a GPU each waits until the
device has finished all the work queued before it, which stalls the host that queues a step's kernels (ten
such waits per robust training step before this class). Its ``nan_strategy`` ``"disable"``, which skips the
check, also drops the weights (torchmetrics 1.9). The training step decides on non-finite losses before anything
is logged, so its means need no check.
"""

from __future__ import annotations

from torch import Tensor
from torchmetrics import MeanMetric


class SyncFreeMean(MeanMetric):
    """A weighted mean with :class:`~torchmetrics.MeanMetric`'s states (so checkpoints of either load into the
    other), updated without a NaN check (a NaN or inf value makes the mean NaN or inf instead of being dropped)
    and without a copy from the host: ``value`` is a tensor on the metric's device, ``weight`` a number (the same
    for every element of ``value``) or such a tensor.
    """

    def update(self, value: Tensor, weight: float | Tensor | None = None) -> None:
        value = value.detach().to(self.dtype)
        if isinstance(weight, Tensor):
            weight = weight.detach().to(self.dtype).broadcast_to(value.shape)
            self.mean_value += (value * weight).sum()
            self.weight += weight.sum()
        else:  # Python numbers travel with the kernels as arguments: no copy
            w = 1.0 if weight is None else float(weight)
            self.mean_value += value.sum() * w
            self.weight += w * value.numel()
