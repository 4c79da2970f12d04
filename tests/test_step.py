"""The functional training step: the module's update, from a user's own LightningModule, and the callbacks' contract."""

from __future__ import annotations

import copy
from dataclasses import replace

import lightning as L
import pytest
import torch
from conftest import TinyNet, fit_steps, tiny_batch
from test_module import DETERMINISTIC_ATTACK, RowCounter, make
from torch.utils.data import DataLoader, TensorDataset

from lightning_advsel import AdversarialSelectionModule, StepSettings, adversarial_step
from lightning_advsel.batch import unpack
from lightning_advsel.callbacks import AdaptivePUp, SelectionMakeup
from lightning_advsel.step import build_pool


@pytest.mark.parametrize("recipe,p_up,attack_score", [("ds", 0.5, "margin"), ("robust", 1.0, "margin"),
                                                      ("selective", 1.0, "gradmatch"), ("selective_ds", 0.5, "loss")])
def test_the_functional_step_gives_the_modules_update(tmp_path, recipe, p_up, attack_score):
    x, y = tiny_batch(16)
    module = make(recipe, p_up, attack_score=attack_score)
    net = copy.deepcopy(module.model)
    fit_steps(module, x, y, tmp_path)

    # The same step by hand: the attack is deterministic (no random start), so no generator is needed.
    settings = StepSettings(recipe=recipe, p_up=p_up, attack_score=attack_score, train_attack=DETERMINISTIC_ATTACK)
    out = adversarial_step(net, x, y, settings)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    out.loss.backward()
    optimizer.step()
    for (name, a), b in zip(module.model.state_dict().items(), net.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(out.record.selected, module.last_selection.selected)
    assert torch.equal(out.record.is_adv, module.last_selection.is_adv)


def test_the_step_forwards_with_grad_only_the_selected_rows():
    net = TinyNet()
    counter = RowCounter(net.net[-1])
    x, y = tiny_batch(16)
    out = adversarial_step(net, x, y, StepSettings(recipe="ds", p_up=0.25, train_attack=DETERMINISTIC_ATTACK))
    out.loss.backward()
    # PGD's two steps run with grad on the 16 attacked rows; the training forward on 8 of the 32 pool rows.
    assert counter.forward_rows == [16, 16, 8] and counter.backward_rows[-1] == 8
    assert out.record.selected.numel() == 8 and out.record.pool_scores.shape == (32,)


def test_pools_replace_or_append_the_attacked_rows():
    x, y = tiny_batch(4)
    attacked = torch.tensor([1, 3])
    x_adv = torch.full((2, 1, 8, 8), 0.5)
    replaced = build_pool(x, y, attacked, x_adv, "replace")
    assert torch.equal(replaced.x[attacked], x_adv) and torch.equal(replaced.x[[0, 2]], x[[0, 2]])
    assert replaced.is_adv.tolist() == [False, True, False, True] and replaced.source.tolist() == [0, 1, 2, 3]
    appended = build_pool(x, y, attacked, x_adv, "append")
    assert appended.x.shape[0] == 6 and torch.equal(appended.y, torch.cat([y, y[attacked]]))
    assert appended.is_adv.tolist() == [False] * 4 + [True] * 2 and appended.source.tolist() == [0, 1, 2, 3, 1, 3]


class UsersModule(L.LightningModule):
    """A user's own module with automatic optimization that calls the step and exposes the callbacks' contract."""

    def __init__(self) -> None:
        super().__init__()
        self.model = TinyNet()
        self.num_classes = 10
        self.settings = StepSettings(recipe="ds", p_up=1.0, train_attack=DETERMINISTIC_ATTACK)
        self.last_selection = None

    @property
    def p_up(self) -> float:
        return self.settings.p_up

    @p_up.setter
    def p_up(self, value: float) -> None:
        self.settings = replace(self.settings, p_up=value)

    def training_step(self, batch, batch_idx):
        x, y, _ = unpack(batch)
        out = adversarial_step(self.model, x, y, self.settings)
        self.last_selection = out.record
        self.log("train/acc", (out.record.logits.argmax(1) == out.record.y[out.record.selected]).float().mean())
        return out.loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_users_own_module_runs_the_step_under_lightnings_automatic_optimization_with_the_callbacks(tmp_path):
    x, y = tiny_batch(64)
    module = UsersModule()
    makeup, adaptive = SelectionMakeup(), AdaptivePUp(monitor="train/acc")
    # Lightning's own clipping and accumulation apply: the step is a function inside automatic optimization.
    trainer = L.Trainer(default_root_dir=tmp_path, max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[makeup, adaptive],
                        gradient_clip_val=1.0, accumulate_grad_batches=2)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=16))
    assert trainer.global_step == 4
    assert adaptive.history[0] == 1.0 and module.p_up == adaptive.history[1] < 1.0
    # Epoch 0 backpropagates the whole 2 x 16 pool of each of its 4 batches; epoch 1 a fraction of it.
    first, second = makeup.history
    assert first["n_clean"] + first["n_adv"] == 4 * 32
    assert second["n_clean"] + second["n_adv"] < 4 * 32


class NoContract(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = TinyNet()

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self.model(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("callback", [SelectionMakeup(), AdaptivePUp()])
def test_a_callback_on_a_module_without_the_contract_fails_at_setup_naming_what_is_missing(tmp_path, callback):
    x, y = tiny_batch(16)
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    with pytest.raises(TypeError, match=r"lacks num_classes, settings, p_up, last_selection"):
        trainer.fit(NoContract(), DataLoader(TensorDataset(x, y), batch_size=16))


def test_p_up_writes_are_checked_and_kept_in_the_settings():
    module = AdversarialSelectionModule(TinyNet(), recipe="ds")
    assert module.p_up == module.settings.p_up == 0.5
    module.p_up = 0.25
    assert module.settings.p_up == 0.25
    with pytest.raises(ValueError, match=r"`p_up` must be in \(0, 1\], got 1.5"):
        module.p_up = 1.5
    assert module.p_up == 0.25


@pytest.mark.parametrize("recipe,p_up,attack_steps,forward,backward", [
    ("standard", 1.0, 0, 16, 16),
    ("robust", 1.0, 16 * 2, 16, 16),
    ("ds", 0.5, 16 * 2, 32 + 16, 16),  # the scoring pass over the 2 x 16 pool, then 16 selected rows
    ("ds", 1.0, 16 * 2, 32, 32),  # no scoring pass at p_up = 1
    ("selective", 1.0, 8 * 2, 16 + 16, 16),  # pre-attack pass over the batch; training forward of the batch
    ("selective_ds", 0.5, 8 * 2, 16 + 8 + 12, 12),  # the pool's clean logits are reused: only 8 new rows scored
])
def test_the_step_reports_the_work_it_did(recipe, p_up, attack_steps, forward, backward):
    x, y = tiny_batch(16)
    net = TinyNet()
    rows = []
    net.net[-1].register_forward_hook(lambda _m, inputs, _o: rows.append(inputs[0].shape[0]))
    out = adversarial_step(net, x, y, StepSettings(recipe=recipe, p_up=p_up, train_attack=DETERMINISTIC_ATTACK))
    assert (out.cost.attack_grad_steps, out.cost.forward_rows, out.cost.backward_rows) == (
        attack_steps, forward, backward)
    # Every forward the hook saw is the attack's (one per attacked row and step) or counted as forward rows.
    assert sum(rows) == attack_steps + forward


def test_a_shared_selection_forward_selects_and_updates_as_the_separate_one_but_backpropagates_the_whole_pool():
    x, y = tiny_batch(16)
    results = {}
    for forward in ("separate", "shared"):
        net = TinyNet()  # no BatchNorm: scoring and training forwards agree exactly
        torch.manual_seed(0)
        net.load_state_dict(TinyNet().state_dict())
        out = adversarial_step(net, x, y, StepSettings(recipe="ds", p_up=0.25, train_attack=DETERMINISTIC_ATTACK,
                                                        selection_forward=forward))
        out.loss.backward()
        results[forward] = (out, [p.grad.clone() for p in net.parameters()])
    (sep, sep_grads), (sha, sha_grads) = results["separate"], results["shared"]
    assert torch.equal(sep.record.selected, sha.record.selected)
    assert sha.loss.item() == pytest.approx(sep.loss.item(), rel=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(sep_grads, sha_grads, strict=True))
    # Separate: a no-grad pass over the 32 pool rows, then 8 rows forward and backward. Shared: 32 and 32.
    assert (sep.cost.forward_rows, sep.cost.backward_rows) == (40, 8)
    assert (sha.cost.forward_rows, sha.cost.backward_rows) == (32, 32)


def test_a_shared_selection_forward_refuses_a_paired_objective():
    from lightning_advsel.objectives import Objective

    with pytest.raises(ValueError, match=r"`selection_forward`='shared' .* objective 'trades'"):
        StepSettings(recipe="ds", objective=Objective("trades"), selection_forward="shared")
