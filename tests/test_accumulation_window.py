"""AccumulationWindow without a Trainer: a stand-in module with a linear model, an SGD optimizer and one process."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_advsel.accumulation import AccumulationWindow


class Owner:
    """What the window needs of a LightningModule."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = nn.Linear(3, 1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.trainer = SimpleNamespace(strategy=SimpleNamespace(world_size=1), is_last_batch=False)
        self.clipped: list[tuple[float, str]] = []

    def optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer

    def manual_backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm) -> None:  # noqa: ANN001
        self.clipped.append((gradient_clip_val, gradient_clip_algorithm))


def batch_loss(model: nn.Module, i: int) -> torch.Tensor:
    x = torch.full((2, 3), float(i + 1))
    return model(x).pow(2).mean()


def train(window: AccumulationWindow, owner: Owner, batches: int, last: int | None = None) -> list[bool]:
    stepped = []
    for i in range(batches):
        owner.trainer.is_last_batch = i == last
        window.backward(owner, batch_loss(owner.model, i))
        stepped.append(window.end_batch(owner))
    return stepped


def test_a_window_steps_once_on_the_mean_of_its_batches_losses():
    owner, reference = Owner(), Owner()
    assert train(AccumulationWindow(3), owner, 3) == [False, False, True]
    loss = sum(batch_loss(reference.model, i) for i in range(3)) / 3
    loss.backward()
    reference.optimizer.step()
    for a, b in zip(owner.model.parameters(), reference.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_the_epochs_last_batch_closes_a_partial_window_and_clipping_comes_first():
    owner = Owner()
    window = AccumulationWindow(4, clip_val=0.5, clip_algorithm="value")
    assert train(window, owner, 2, last=1) == [False, True]
    assert owner.clipped == [(0.5, "value")] and window.window_batches == 0


def test_a_window_whose_batches_were_all_skipped_does_not_step():
    owner, window = Owner(), AccumulationWindow(2)
    assert [window.end_batch(owner), window.end_batch(owner)] == [False, False]
    assert window.batches_trained == 2 and owner.model.weight.grad is None


def test_a_checkpoint_inside_a_window_keeps_its_gradients_and_restores_them():
    owner, window = Owner(), AccumulationWindow(3)
    train(window, owner, 1)
    state = window.state_dict(owner.trainer.strategy, owner.model)
    assert state["window_batches"] == 1 and state["batches_trained"] == 1
    resumed, fresh = AccumulationWindow(3), Owner()
    resumed.load_state_dict(state, global_step=0)
    resumed.restore_grads(fresh.model)
    assert resumed.has_grads and torch.equal(fresh.model.weight.grad, owner.model.weight.grad)


def test_a_checkpoint_from_before_accumulation_counts_one_batch_per_step():
    window = AccumulationWindow(2)
    window.load_state_dict({}, global_step=12)
    assert window.batches_trained == 12 and not window.has_grads and window.seed_offset(global_step=12) == 12
    assert AccumulationWindow(1).seed_offset(global_step=5) == 5


def test_the_optimizer_steps_count_each_epochs_partial_window():
    trainer = SimpleNamespace(estimated_stepping_batches=50, num_training_batches=10, max_epochs=5, max_steps=-1)
    assert AccumulationWindow(1).optimizer_steps(trainer) == 50
    assert AccumulationWindow(3).optimizer_steps(trainer) == 4 * 5
    assert AccumulationWindow(3).optimizer_steps(SimpleNamespace(**{**vars(trainer), "max_steps": 7})) == 7


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"batches": 0}, r"`accumulate_grad_batches` must be an integer >= 1"),
    ({"clip_val": -1.0}, r"`gradient_clip_val` must be a finite number"),
    ({"clip_algorithm": "l2"}, r"`gradient_clip_algorithm` must be one of"),
])
def test_bad_settings_are_refused_by_the_modules_argument_names(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AccumulationWindow(**kwargs)
