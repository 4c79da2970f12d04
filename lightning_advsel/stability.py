"""The stability baseline's core: the profile file and the training subset it selects.

Dong, Liu and Shang, "Data profiling for adversarial training: on the ruin of problematic data" (arXiv
2102.07437), reference [13] of the DS paper: during a full PGD adversarial-training run, count for every
training sample the epochs in which its training adversarial example was misclassified; rank the samples by
that count; train PGD-AT from scratch on the most stable fraction.

* :class:`~lightning_advsel.callbacks.StabilityProfile` counts during the first run and writes a
  :class:`Profile` with :func:`write_profile` (JSON, readable without this package).
* The data modules' ``subset_file`` argument reads it back (:func:`read_profile`), checks that it was made for
  their training split (:func:`check_profile`), and trains on :func:`subset_indices`.

A sample's index is its position in the data module's training split (after the seeded validation split), so a
profile belongs to one data set size and one ``split_seed``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import Tensor

from lightning_advsel import selection
from lightning_advsel.checks import check_choice, check_fraction

PROFILE_FORMAT = "lightning_advsel.stability_profile"
PROFILE_VERSION = 1
Keep = Literal["stable", "unstable"]
KEEP: tuple[str, ...] = get_args(Keep)

_DESCRIPTION = (
    "counts[i]: epochs of the profiling run in which the PGD training example of training sample i was "
    "misclassified by the training forward pass; epochs_seen[i]: epochs in which sample i was trained on. "
    "i is the position in the data module's training split (after its seeded validation split)."
)


@dataclass(frozen=True)
class Profile:
    """Per-sample instability counts of one profiling run.

    Attributes:
        counts: epochs in which each training sample's adversarial example was misclassified, shape ``(N,)``.
        epochs_seen: epochs in which each sample was trained on, shape ``(N,)`` (below ``epochs`` only when
            epochs were cut short, e.g. by ``limit_train_batches``).
        epochs: training epochs the counts cover.
        split_seed: the data module's ``split_seed`` (which samples form the training split).
        wall_time_s: wall time of the profiling fit, seconds (training and validation, summed over resumes).
        data: class name of the data module.
    """

    counts: Tensor
    epochs_seen: Tensor
    epochs: int
    split_seed: int
    wall_time_s: float
    data: str = ""

    @property
    def num_samples(self) -> int:
        return int(self.counts.numel())


def write_profile(path: str | os.PathLike, profile: Profile) -> Path:
    """Write ``profile`` to ``path`` as JSON (folders created as needed); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {
        "format": PROFILE_FORMAT, "version": PROFILE_VERSION, "description": _DESCRIPTION,
        "data": profile.data, "num_samples": profile.num_samples, "split_seed": profile.split_seed,
        "epochs": profile.epochs, "wall_time_s": round(profile.wall_time_s, 3),
        "counts": profile.counts.tolist(), "epochs_seen": profile.epochs_seen.tolist(),
    }
    path.write_text(json.dumps(content) + "\n")
    return path


def read_profile(path: str | os.PathLike) -> Profile:
    """Read a profile written by :func:`write_profile`.

    Raises:
        FileNotFoundError: if ``path`` does not exist (run the profiling config first).
        ValueError: naming the file, for a file that is not such a profile or whose fields are inconsistent.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"`subset_file` {str(path)!r} does not exist; write it first with a profiling run (the "
            f"StabilityProfile callback, e.g. configs/digits/base.yaml with configs/recipes/stability_profile.yaml)"
        )
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"`subset_file` {str(path)!r} is not a JSON stability profile: {err}") from err
    if not isinstance(content, dict) or content.get("format") != PROFILE_FORMAT:
        raise ValueError(f"`subset_file` {str(path)!r} is not a stability profile (no \"format\": {PROFILE_FORMAT!r})")
    try:
        counts = torch.tensor(content["counts"], dtype=torch.long)
        seen = torch.tensor(content["epochs_seen"], dtype=torch.long)
        profile = Profile(counts=counts, epochs_seen=seen, epochs=int(content["epochs"]),
                          split_seed=int(content["split_seed"]), wall_time_s=float(content["wall_time_s"]),
                          data=str(content.get("data", "")))
        num_samples = int(content["num_samples"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"`subset_file` {str(path)!r} has a missing or malformed field: {err!r}") from err
    if counts.ndim != 1 or seen.shape != counts.shape or counts.numel() != num_samples:
        raise ValueError(
            f"`subset_file` {str(path)!r} holds {counts.numel()} counts and {seen.numel()} epochs_seen for "
            f"num_samples={num_samples}; expected one of each per sample"
        )
    if bool((counts < 0).any()) or bool((counts > seen).any()) or not math.isfinite(profile.wall_time_s):
        raise ValueError(
            f"`subset_file` {str(path)!r} has counts outside [0, epochs_seen] or a non-finite wall_time_s"
        )
    return profile


def check_profile(profile: Profile, path: str | os.PathLike, num_samples: int, split_seed: int) -> None:
    """Refuse a profile made for another training split.

    Raises:
        ValueError: naming the file and the mismatch, if the profile's data set size or split seed differ.
    """
    mismatches = []
    if profile.num_samples != num_samples:
        mismatches.append(f"it profiles {profile.num_samples} training samples, this data module has {num_samples}")
    if profile.split_seed != split_seed:
        mismatches.append(f"it was made with split_seed={profile.split_seed}, this data module has "
                          f"split_seed={split_seed}")
    if mismatches:
        raise ValueError(
            f"`subset_file` {str(path)!r} was made for another training split: {'; '.join(mismatches)}. "
            f"Profile this data set with these settings, or set them as in the profiling run"
        )


def subset_indices(counts: Tensor, fraction: float, keep: Keep = "stable") -> Tensor:
    """Training-split positions of the ``fraction`` of samples with the fewest (``"stable"``) or the most
    (``"unstable"``) misclassified epochs; ties go to the lower index. Returned in ascending order.

    Raises:
        ValueError: for ``fraction`` outside (0, 1] or an unknown ``keep``.
    """
    fraction = check_fraction("subset_fraction", fraction)
    check_choice("subset_keep", keep, KEEP)
    k = selection.fraction_count(counts.numel(), fraction)
    # A stable sort keeps index order among equal counts, so ties are broken the same way every time.
    key = counts.long() if keep == "stable" else -counts.long()
    order = torch.sort(key, stable=True).indices
    return order[:k].sort().values
