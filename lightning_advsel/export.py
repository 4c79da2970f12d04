"""Take the trained classifier away: files that load with torch alone, without this package.

* ``"state_dict"``: the classifier's ``state_dict`` (keys as in the network itself, without the module's
  ``model.`` prefix), saved with ``torch.save``. Load it with ``torch.load(path, weights_only=True)`` into the
  same architecture: ``net.load_state_dict(...)``.
* ``"torch_export"``: the classifier in eval mode as a ``torch.export`` program (a ``.pt2`` file), with a free batch
  dimension. Load and run it with ``torch.export.load(path).module()(x)``: no Python class needed.

TorchScript is not offered: ``torch.jit.script`` and ``trace`` are deprecated in favour of ``torch.export``
(recent torch warns so), and scripting fails on the package's own normalization layer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from lightning_advsel.attacks import model_mode
from lightning_advsel.checks import check_choice, check_path
from lightning_advsel.module import AdversarialSelectionModule

ExportFormat = Literal["state_dict", "torch_export"]
FORMATS: tuple[str, ...] = get_args(ExportFormat)


def export_model(model: nn.Module, path: str | os.PathLike, format: ExportFormat = "state_dict",
                 example_input: Tensor | None = None) -> Path:
    """Write the classifier ``model`` to ``path`` in ``format`` (see the module docstring); returns the path.

    Args:
        model: the classifier, or an :class:`~lightning_advsel.AdversarialSelectionModule` (its ``model`` is
            written).
        path: the file to write; missing parent folders are created.
        format: ``"state_dict"`` or ``"torch_export"``.
        example_input: a batch of inputs ``(B, ...)`` in [0, 1], needed by ``"torch_export"`` (it traces the model on
            it; every dimension but the batch is fixed to its size). Two copies of its first row are used, since
            torch.export fixes a dimension of size 1.

    Raises:
        ValueError: for an unknown ``format``, a ``model`` that is not an ``nn.Module``, a ``"torch_export"`` without
            ``example_input`` or to a ``path`` not ending in ``.pt2`` (torch.export's archive), or a model that
            torch.export cannot capture (the message suggests ``"state_dict"``).
    """
    check_choice("format", format, FORMATS)
    path = Path(check_path("path", path, "a file path"))
    if isinstance(model, AdversarialSelectionModule):
        model = model.model
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be an nn.Module classifier, got {type(model).__name__}")
    if format == "torch_export" and not isinstance(example_input, Tensor):
        raise ValueError(f"`format`='torch_export' needs `example_input`, a batch of inputs, got "
                         f"{type(example_input).__name__}")
    if format == "torch_export" and path.suffix != ".pt2":
        raise ValueError(f"`path` of a 'torch_export' program must end in .pt2 (torch.export's archive), "
                         f"got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if format == "state_dict":
        torch.save({key: value.detach().cpu() for key, value in model.state_dict().items()}, path)
        return path
    example = example_input[:1].detach().repeat(2, *([1] * (example_input.dim() - 1)))
    example = example.to(next(model.parameters(), example).device)
    batch = torch.export.Dim("batch")
    with model_mode(model, "eval"):
        try:
            program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        except Exception as err:  # torch.export reports what it cannot capture with many error types
            raise ValueError(
                f"`format`='torch_export' cannot capture {type(model).__name__} ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); export `format`='state_dict' instead and load it "
                f"into the same architecture"
            ) from err
    torch.export.save(program, path)
    return path
