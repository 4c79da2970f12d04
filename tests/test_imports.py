"""The package's public names are reachable from ``import lightning_advsel`` alone, as Lightning's are."""

from __future__ import annotations

import subprocess
import sys


def test_callbacks_are_reachable_after_importing_the_package_alone():
    # A fresh interpreter: in this one, other tests have imported the subpackage by name already.
    code = ("import lightning_advsel as la; from lightning.pytorch.callbacks import Callback; "
            "assert issubclass(la.callbacks.SelectionMakeup, Callback); print(sorted(la.callbacks.__all__)[:2])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "['AdaptivePUp', 'MinimumAdversarialPool']"
