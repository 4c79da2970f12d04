"""Install the lowest versions that pyproject.toml's dependency bounds allow into a fresh virtual environment, and
run a small part of the test suite there: the bounds are true only if this passes.

Every ``name>=X`` of ``[project] dependencies`` (and of the ``test`` extra) is pinned to ``name==X``; pip resolves
the rest. Slow (torch alone is a large download) and so not part of CI; a maintainer runs it before a release or
after changing a bound::

    python tools/check_lowest_deps.py                      # venv in a temporary folder, then the tests
    python tools/check_lowest_deps.py --dry-run            # only check that the pins exist and resolve together
    python tools/check_lowest_deps.py --python python3.10 --venv /tmp/lowest -- tests/test_faults.py -x

Needs Python >= 3.11 to read pyproject.toml (``tomllib``); ``--python`` chooses the interpreter of the environment.
Exits with pip's or pytest's exit status.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
# Older releases these pins need beside them: torch 2.2 and scikit-learn 1.3 were built against NumPy 1.
EXTRA_CONSTRAINTS = ["numpy<2"]
# A few seconds to a minute each on 2 CPU cores: the module, the CLI's fit/checkpoint/validate, predict and export.
DEFAULT_TESTS = ["tests/test_faults.py", "tests/test_predict_export.py",
                 "tests/test_cli.py::test_fit_checkpoint_load_and_validate_reproduce_the_validation_numbers", "-q"]
# Test requirements left out of that environment: a linter, and the AutoAttack packages (the tests that need them
# skip without them; the DEFAULT_TESTS need neither).
UNPINNED = ("ruff", "torchattacks", "pyautoattack")
LOWER_BOUND = re.compile(r"^\s*([A-Za-z0-9_.\-]+(?:\[[^\]]*\])?)\s*>=\s*([0-9][^,;\s]*)\s*$")


def lowest_pins(requirements: list[str]) -> list[str]:
    """``name==X`` for each ``name>=X`` requirement (extras kept); a requirement without a lower bound is refused.

    Raises:
        ValueError: naming a requirement that is not of the form ``name>=X``.
    """
    pins = []
    for requirement in requirements:
        match = LOWER_BOUND.match(requirement)
        if match is None:
            raise ValueError(f"requirement {requirement!r} must be of the form 'name>=X' to have a lowest version")
        pins.append(f"{match[1]}=={match[2]}")
    return pins


def run(command: list[str]) -> None:
    print("+", " ".join(command), flush=True)
    status = subprocess.call(command, cwd=REPO)
    if status:
        sys.exit(status)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter of the new environment")
    parser.add_argument("--venv", type=Path, help="folder of the environment (default: a temporary folder)")
    parser.add_argument("--dry-run", action="store_true", help="resolve the pins with pip, install nothing")
    parser.add_argument("pytest_args", nargs="*", help=f"after --: pytest's arguments (default: {DEFAULT_TESTS})")
    args = parser.parse_args()

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    test_extra = [r for r in project["optional-dependencies"]["test"] if not r.startswith(UNPINNED)]
    pins = lowest_pins(project["dependencies"] + test_extra) + EXTRA_CONSTRAINTS
    print("lowest versions:", " ".join(pins), flush=True)
    if args.dry_run:
        run([args.python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", *pins])
        print("the lowest versions exist and resolve together", flush=True)
        return
    venv = args.venv or Path(tempfile.mkdtemp(prefix="lowest-deps-"))
    run([args.python, "-m", "venv", str(venv)])
    python = str(venv / ("Scripts" if sys.platform == "win32" else "bin") / "python")
    run([python, "-m", "pip", "install", *pins])
    run([python, "-m", "pip", "install", "--no-deps", "-e", str(REPO)])
    run([python, "-m", "pip", "freeze"])
    run([python, "-m", "pytest", *(args.pytest_args or DEFAULT_TESTS)])
    print(f"passed with the lowest versions ({venv})", flush=True)


if __name__ == "__main__":
    main()
