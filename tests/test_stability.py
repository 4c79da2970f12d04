"""The stability baseline: per-sample counts during PGD training, the subset they select, and the two-run CLI."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TinyNet, digits, run_spawned_script
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_advsel import AdversarialSelectionModule, AttackConfig
from lightning_advsel.batch import unpack
from lightning_advsel.callbacks import StabilityCost, StabilityProfile
from lightning_advsel.cli import build_cli
from lightning_advsel.data import DigitsDataModule
from lightning_advsel.stability import Profile, read_profile, subset_indices, write_profile

N_DIGITS_TRAIN = 1797 - 270 - 270  # DigitsDataModule's default split


class RecordingNet(TinyNet):
    """TinyNet that keeps the logits of every training forward (train mode, autograd on, input not attacked)."""

    def __init__(self) -> None:
        super().__init__()
        self.trained: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.training and torch.is_grad_enabled() and not x.requires_grad:
            self.trained.append(out.detach().clone())
        return out


class BatchLog(Callback):
    """Keeps (epoch, index, labels) of every training batch, in order."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        _, y, (index,) = unpack(batch)
        self.rows.append((trainer.current_epoch, index.clone(), y.clone()))


def robust_module(net: torch.nn.Module | None = None, **kwargs) -> AdversarialSelectionModule:
    settings = {"recipe": "robust", "p_up": 1.0, "optimizer": lambda p: torch.optim.SGD(p, lr=0.5),
                "train_attack": AttackConfig(eps=0.15, alpha=0.1, steps=2, mode="train"),
                "eval_attack": AttackConfig(eps=0.1, alpha=0.05, steps=2)} | kwargs
    return AdversarialSelectionModule(net if net is not None else TinyNet(), **settings)


def trainer(tmp_path: Path, callbacks: list[Callback], **kwargs) -> L.Trainer:
    settings = {"max_epochs": 3, "limit_val_batches": 1, "logger": False, "enable_checkpointing": False,
                "enable_progress_bar": False, "enable_model_summary": False, "accelerator": "cpu", "devices": 1,
                "default_root_dir": tmp_path} | kwargs
    return L.Trainer(callbacks=callbacks, **settings)


def test_counts_equal_a_hand_count_of_misclassified_training_examples(tmp_path):
    net, log = RecordingNet(), BatchLog()
    profile_cb = StabilityProfile(path=str(tmp_path / "profile.json"))
    torch.manual_seed(0)
    # 5 batches per epoch of which 4 are trained: some samples are skipped in some epochs.
    trainer(tmp_path, [log, profile_cb], limit_train_batches=4).fit(
        robust_module(net), DigitsDataModule(batch_size=256, return_index=True))

    assert len(net.trained) == len(log.rows) == 12  # one training forward per step, 4 steps x 3 epochs
    wrong: dict[tuple[int, int], bool] = {}
    for (epoch, index, y), logits in zip(log.rows, net.trained, strict=True):
        for i, label, pred in zip(index.tolist(), y.tolist(), logits.argmax(1).tolist(), strict=True):
            wrong[epoch, i] = wrong.get((epoch, i), False) or pred != label
    counts, seen = [0] * N_DIGITS_TRAIN, [0] * N_DIGITS_TRAIN
    for (_, i), w in wrong.items():
        seen[i] += 1
        counts[i] += w

    profile = read_profile(tmp_path / "profile.json")
    assert profile.counts.tolist() == counts and profile.epochs_seen.tolist() == seen
    assert profile.epochs == 3 and profile.split_seed == 0 and profile.num_samples == N_DIGITS_TRAIN
    assert profile.data == "DigitsDataModule" and profile.wall_time_s > 0
    # The run is informative: counts differ between samples and some samples missed an epoch.
    assert len(set(counts)) >= 3 and min(seen) < 3 == max(seen)


def test_subset_indices_keep_the_fewest_or_most_misclassified_with_ties_to_the_lower_index():
    counts = torch.tensor([2, 0, 1, 0, 2, 1])
    assert subset_indices(counts, 0.5, "stable").tolist() == [1, 2, 3]
    assert subset_indices(counts, 0.5, "unstable").tolist() == [0, 2, 4]
    assert subset_indices(counts, 1.0, "stable").tolist() == list(range(6))
    assert subset_indices(counts, 0.2, "stable").tolist() == [1]  # round(1.2) samples


def write_digits_profile(path: Path, counts: torch.Tensor, split_seed: int = 0) -> Path:
    return write_profile(path, Profile(counts=counts, epochs_seen=torch.full_like(counts, 9), epochs=9,
                                       split_seed=split_seed, wall_time_s=12.5, data="DigitsDataModule"))


@pytest.mark.parametrize("keep", ["stable", "unstable"])
def test_the_data_module_trains_on_the_chosen_subset_and_leaves_validation_and_test_alone(tmp_path, keep):
    counts = torch.randint(0, 10, (N_DIGITS_TRAIN,), generator=torch.Generator().manual_seed(1))
    path = write_digits_profile(tmp_path / "p.json", counts)
    full = DigitsDataModule(batch_size=100)
    full.setup()
    dm = DigitsDataModule(batch_size=100, return_index=True, subset_file=str(path), subset_fraction=0.3,
                          subset_keep=keep)
    dm.setup()

    sign = 1 if keep == "stable" else -1
    ranked = sorted(range(N_DIGITS_TRAIN), key=lambda i: (sign * int(counts[i]), i))
    expected = sorted(ranked[:round(0.3 * N_DIGITS_TRAIN)])
    seen: list[int] = []
    x_all, y_all = full.train_set.tensors
    for batch in dm.train_dataloader():
        x, y, (index,) = unpack(batch)
        assert index.dtype == torch.long
        assert torch.equal(x, x_all[index]) and torch.equal(y, y_all[index])  # index: position in the split
        seen += index.tolist()
    assert sorted(seen) == expected
    for name in ("val_set", "test_set"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(dm, name).tensors, getattr(full, name).tensors,
                                                      strict=True))
    assert dm.subset_profile.wall_time_s == 12.5


def test_plain_batches_stay_pairs_and_index_batches_are_triples():
    plain, indexed = DigitsDataModule(batch_size=32), DigitsDataModule(batch_size=32, return_index=True)
    plain.setup()
    indexed.setup()
    assert len(next(iter(plain.train_dataloader()))) == 2
    assert len(next(iter(indexed.train_dataloader()))) == 3
    assert len(next(iter(indexed.val_dataloader()))) == 2  # indices are for training batches only


@pytest.mark.parametrize("size,seed,match", [
    (N_DIGITS_TRAIN - 1, 0,
     rf"it profiles {N_DIGITS_TRAIN - 1} training samples, this data module has {N_DIGITS_TRAIN}"),
    (N_DIGITS_TRAIN, 3, r"it was made with split_seed=3, this data module has split_seed=0"),
])
def test_a_profile_of_another_split_is_refused_naming_the_file(tmp_path, size, seed, match):
    path = write_digits_profile(tmp_path / "other.json", torch.zeros(size, dtype=torch.long), split_seed=seed)
    dm = DigitsDataModule(subset_file=str(path))
    with pytest.raises(ValueError, match=rf"`subset_file` '{path}' was made for another training split: {match}"):
        dm.setup()


def test_missing_and_malformed_profiles_are_refused_naming_the_file(tmp_path):
    missing = tmp_path / "none.json"
    with pytest.raises(FileNotFoundError, match=rf"'{missing}' does not exist.*stability_profile.yaml"):
        DigitsDataModule(subset_file=str(missing)).setup()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=rf"'{bad}' is not a JSON stability profile"):
        DigitsDataModule(subset_file=str(bad)).setup()
    bad.write_text(json.dumps({"counts": [0, 1]}))
    with pytest.raises(ValueError, match=rf"'{bad}' is not a stability profile"):
        DigitsDataModule(subset_file=str(bad)).setup()


@pytest.mark.parametrize("kwargs,match", [
    ({"subset_fraction": 0.0}, r"`subset_fraction` must be in \(0, 1\], got 0.0"),
    ({"subset_keep": "middle"}, r"`subset_keep` must be one of \('stable', 'unstable'\), got 'middle'"),
    ({"return_index": "yes"}, r"`return_index` must be true or false, got 'yes'"),
    ({"subset_file": ""}, r"`subset_file` must be the path of a stability profile or None, got ''"),
])
def test_bad_subset_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


@pytest.mark.parametrize("module_kwargs,data_kwargs,match", [
    ({}, {}, r"set `return_index: true`|`return_index: true`"),
    ({"recipe": "standard"}, {"return_index": True}, r"the recipe must attack every row; `recipe`='standard'"),
    ({"recipe": "ds", "p_up": 0.5}, {"return_index": True}, r"sees every row only at `p_up`=1, got p_up=0.5"),
])
def test_profiling_refuses_batches_without_index_and_recipes_that_skip_rows_before_training(
        tmp_path, module_kwargs, data_kwargs, match):
    module = robust_module(**module_kwargs)
    run = trainer(tmp_path, [StabilityProfile(path=str(tmp_path / "p.json"))])
    with pytest.raises(ValueError, match=match):
        run.fit(module, DigitsDataModule(batch_size=256, **data_kwargs))
    assert run.global_step == 0 and not (tmp_path / "p.json").exists()


class HalvePUp(Callback):
    """Sets the module's ``p_up`` to 0.5 before the second training batch."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 1:
            pl_module.p_up = 0.5


def test_profiling_stops_at_a_step_that_trained_on_only_some_adversarial_examples(tmp_path):
    run = trainer(tmp_path, [HalvePUp(), StabilityProfile(path=str(tmp_path / "p.json"))])
    with pytest.raises(ValueError, match=r"step 2 trained on 64 adversarial examples of a batch of 128; .* was p_up "
                                         r"changed during training\?"):
        run.fit(robust_module(), DigitsDataModule(batch_size=128, return_index=True))
    assert run.global_step == 2 and not (tmp_path / "p.json").exists()


def test_the_cost_callback_refuses_a_run_without_a_subset(tmp_path):
    run = trainer(tmp_path, [StabilityCost()])
    with pytest.raises(ValueError, match=r"StabilityCost .* set `subset_file`"):
        run.fit(robust_module(), DigitsDataModule(batch_size=256))
    assert run.global_step == 0


def profile_run(tmp_path: Path, name: str, ckpt_path: str | None = None, **kwargs) -> StabilityProfile:
    torch.manual_seed(0)
    callback = StabilityProfile(path=str(tmp_path / f"{name}.json"))
    save = ModelCheckpoint(dirpath=tmp_path / name, filename="{step}", every_n_train_steps=7, save_top_k=-1,
                           save_last=True)
    trainer(tmp_path, [callback, save], enable_checkpointing=True, **kwargs).fit(
        robust_module(), DigitsDataModule(batch_size=256, return_index=True), ckpt_path=ckpt_path)
    return callback


def test_a_resumed_profile_has_the_counts_of_an_uninterrupted_run(tmp_path):
    straight = read_profile(profile_run(tmp_path, "straight").saved_path)
    # Interrupted mid-epoch (step 7 is batch 2 of epoch 1, 5 batches per epoch) and at an epoch's end.
    profile_run(tmp_path, "mid", max_steps=7)
    mid = profile_run(tmp_path, "mid", ckpt_path=str(tmp_path / "mid" / "step=7.ckpt"))
    profile_run(tmp_path, "end", max_epochs=2)
    end = profile_run(tmp_path, "end", ckpt_path=str(tmp_path / "end" / "last.ckpt"))
    assert straight.epochs == 3 and int(straight.counts.sum()) > 0
    for callback in (mid, end):
        resumed = read_profile(callback.saved_path)
        assert torch.equal(resumed.counts, straight.counts)
        assert torch.equal(resumed.epochs_seen, straight.epochs_seen) and resumed.epochs == 3
    # The wall time adds up the interrupted and the resumed segment.
    saved = torch.load(tmp_path / "mid" / "step=7.ckpt", weights_only=True)["callbacks"]
    (state,) = [v for k, v in saved.items() if k.startswith("StabilityProfile")]
    assert read_profile(mid.saved_path).wall_time_s > state["wall_time_s"] > 0


def test_the_two_digits_commands_run_in_sequence_from_the_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs' fixed profile path is relative to the working directory
    short = ["--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
             "--model.init_args.train_attack.steps", "3", "--model.init_args.eval_attack.steps", "3"]
    first = build_cli(["fit", *digits("stability_profile"), *short])
    path = tmp_path / "lightning_logs" / "digits" / "stability_profile" / "stability_profile.json"
    profile = read_profile(path)
    assert profile.epochs == 2 and profile.num_samples == N_DIGITS_TRAIN

    second = build_cli(["fit", *digits("stability"), *short])
    kept = subset_indices(profile.counts, 0.5, "stable")
    view = second.datamodule.training_view()
    assert view.indices == kept.tolist() and len(kept) == 629
    assert second.trainer.global_step == 2 * 10  # ceil(629 / 64) steps per epoch
    (cost,) = [c for c in second.trainer.callbacks if isinstance(c, StabilityCost)]
    assert cost.total_s > profile.wall_time_s > 0
    assert first.trainer.global_step == 2 * 20  # ceil(1257 / 64)


@pytest.mark.slow
def test_two_ranks_sum_their_disjoint_rows_into_the_counts_of_one_process(tmp_path):
    from ddp_stability_run import BATCH, CKPT_STEP, run

    run_spawned_script("ddp_stability_run.py", tmp_path, 2)
    run(str(tmp_path), 1)

    two, one = (read_profile(tmp_path / f"profile_devices{d}.json") for d in (2, 1))
    assert torch.equal(two.counts, one.counts) and 0 < int(one.counts.sum()) < 2 * N_DIGITS_TRAIN
    # Every sample is seen once per epoch, also the one the sampler repeats to give both ranks 629 rows.
    assert two.epochs == 2 and two.epochs_seen.tolist() == [2] * N_DIGITS_TRAIN
    # A mid-epoch checkpoint holds the running epoch's rows of both ranks.
    for devices in (1, 2):
        callbacks = torch.load(tmp_path / f"ckpt{devices}" / f"step={CKPT_STEP}.ckpt", weights_only=True)["callbacks"]
        (state,) = [v for k, v in callbacks.items() if k.startswith("StabilityProfile")]
        assert int(state["epoch_seen"].sum()) == devices * CKPT_STEP * BATCH
