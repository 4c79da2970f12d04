"""Two nodes on one machine: ``torchrun --nnodes 2`` launches the CLI twice, Lightning's DDP joins them (gloo).

Each node is a separate ``torchrun`` with its ``--node-rank`` and the shared rendezvous address, as on a
cluster; here both run on localhost. The main job (digits, ``ds``) trains a few steps with the global
selection scope and must equal one process trained on the two nodes' batches concatenated.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from conftest import REPO, config_args

from lightning_advsel.cli import build_cli

pytestmark = pytest.mark.slow
# A short main job: 3 steps of one epoch. The training attack starts from the clean input (no random start),
# because random starts are drawn per rank and would differ from one process's.
SHORT = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
         "--trainer.num_sanity_val_steps", "0",
         "--trainer.enable_model_summary", "false", "--model.init_args.train_attack.steps", "2",
         "--model.init_args.train_attack.random_start", "false", "--model.init_args.eval_attack.steps", "2",
         "--model.init_args.selection_scope", "global"]
BATCH = 64  # digits base's clean rows per batch, per rank
# Largest parameter difference accepted between two nodes and one process. Gradients agree to float32
# summation order; Adam divides each step by the gradient's running magnitude, which lets that noise grow in
# parameters whose gradients are tiny (1.1e-6 measured after 3 steps).
TOLERANCE = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_nodes(args: list[str], cwd, timeout_s: int = 240) -> list[str]:  # noqa: ANN001
    """Start one ``torchrun`` per node (node ranks 0 and 1, one process each) and wait; return their output."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    rendezvous = ["--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
                  "--master-port", str(free_port())]
    # New sessions, so that a hung node is killed with the process torchrun started.
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *rendezvous, "--node-rank", str(rank),
                               "-m", "lightning_advsel.cli", *args], env=env, cwd=cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True) for rank in (0, 1)]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=timeout_s)[0])
    except subprocess.TimeoutExpired:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
        pytest.fail(f"the two nodes did not finish in {timeout_s} s:\n" +
                    "\n".join(node.communicate()[0][-2000:] for node in nodes))
    for rank, (node, output) in enumerate(zip(nodes, outputs, strict=True)):
        assert node.returncode == 0, f"node {rank} failed:\n{output[-3000:]}"
    return outputs


def test_two_torchrun_nodes_train_the_main_job_as_one_process_on_the_concatenated_batch(tmp_path):
    saver = {"class_path": "node_weights.SaveWeights", "init_args": {"dirpath": str(tmp_path / "ranks")}}
    outputs = launch_nodes(["fit", *config_args("digits/base.yaml", "recipes/ds.yaml"), *SHORT,
                            "--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.strategy", "ddp",
                            f"--trainer.callbacks+={json.dumps(saver)}",
                            "--trainer.logger.init_args.save_dir", str(tmp_path / "nodes")], cwd=tmp_path)
    assert "val accuracy: clean" in outputs[0]  # rank 0 prints the summary

    ranks = [torch.load(tmp_path / "ranks" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [(r["node_rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    for name, value in ranks[0]["state_dict"].items():
        assert torch.equal(value, ranks[1]["state_dict"][name]), name  # DDP kept the replicas identical
    (ckpt,) = (tmp_path / "nodes").rglob("last.ckpt")  # written once, by global rank 0
    nodes = torch.load(ckpt, weights_only=True)
    assert nodes["global_step"] == 3

    # One process on the concatenated batch: the ranks' batches of step i are rows 2 * BATCH * i ... of the
    # same shuffled order, split between them, so one process with twice the batch sees their union.
    build_cli(["fit", *config_args("digits/base.yaml", "recipes/ds.yaml"), *SHORT,
               "--data.init_args.batch_size", str(2 * BATCH), "--trainer.logger.init_args.save_dir",
               str(tmp_path / "single")])
    (single_ckpt,) = (tmp_path / "single").rglob("last.ckpt")
    single = torch.load(single_ckpt, weights_only=True)
    diff = max(float((nodes["state_dict"][k] - v).abs().max()) for k, v in single["state_dict"].items())
    assert diff <= TOLERANCE, f"max |two nodes - one process| = {diff}"
    # The same rows were attacked, scored and backpropagated: the work totals, summed over ranks, are equal.
    assert nodes["advsel"]["work"] == single["advsel"]["work"]
