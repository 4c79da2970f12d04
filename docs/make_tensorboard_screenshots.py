"""Remake the README's TensorBoard screenshots: three digits runs in one log folder, then TensorBoard in a browser.

    python docs/make_tensorboard_screenshots.py              # trains, serves, screenshots into docs/
    python docs/make_tensorboard_screenshots.py --skip-training --log-dir runs/lightning_logs

1. Trains ``robust``, ``ds`` and ``selective_margin`` on ``configs/digits/base.yaml`` with the dashboards overlay,
   as shipped (15 epochs each; ``--max-epochs`` shortens them), into ``--log-dir``: the runs
   ``digits/robust``, ``digits/ds`` and ``digits/selective_margin``. Each run's printed accuracy and cost lines
   are kept in ``<log dir>/summaries.txt``.
2. Starts ``tensorboard --logdir <log dir>`` on a free local port and waits until it answers.
3. Takes ``docs/tensorboard-hparams.png`` (the HPARAMS table) and ``docs/tensorboard-scalars.png`` (the custom
   scalars page) with headless Chromium from the system packages (``apt-get install chromium``; the binary is
   looked up as ``chromium``, ``chromium-browser``, ``google-chrome``, or given with ``--browser``).
4. Stops the server.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = ("robust", "ds", "selective_margin")
SHOTS = {  # file under docs/: (TensorBoard page, window width x height in pixels, page zoom)
    "tensorboard-hparams.png": ("#hparams", (2900, 420), 1.0),
    "tensorboard-scalars.png": ("#custom_scalars", (1700, 1620), 1.0),
}


def train(log_dir: Path, max_epochs: int | None) -> None:
    """The three runs, one after the other, through the command line a user types."""
    lines = []
    for recipe in RECIPES:
        args = [sys.executable, "-m", "lightning_advsel.cli", "fit", "-c", "configs/digits/base.yaml",
                "-c", f"configs/recipes/{recipe}.yaml", "-c", "configs/callbacks/dashboards.yaml",
                "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(log_dir)]
        if max_epochs is not None:
            args += ["--trainer.max_epochs", str(max_epochs)]
        started = time.perf_counter()
        out = subprocess.run(args, cwd=REPO, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"training digits/{recipe} failed:\n{out.stderr[-3000:]}")
        printed = [line for line in out.stdout.splitlines() if line.startswith(("val accuracy", "training cost"))]
        lines += [f"digits/{recipe} ({time.perf_counter() - started:.0f} s wall)", *printed, ""]
        print("\n".join(lines[-len(printed) - 2:]), flush=True)
    (log_dir / "summaries.txt").write_text("\n".join(lines))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(log_dir: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(log_dir), "--port", str(port),
                               "--host", "127.0.0.1", "--reload_interval", "0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"tensorboard exited: {server.stderr.read()[-2000:]}")
        try:
            # The runs are listed once TensorBoard has read the event files.
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=5) as reply:
                if len(reply.read()) > 2:
                    return server
        except OSError:
            pass
        time.sleep(1)
    server.kill()
    raise SystemExit(f"tensorboard did not answer on port {port} within 120 s")


def screenshot(browser: str, url: str, size: tuple[int, int], zoom: float, path: Path) -> None:
    # The virtual-time budget lets TensorBoard's page fetch its data and draw before the picture is taken.
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={size[0]},{size[1]}", f"--force-device-scale-factor={zoom}",
                    "--virtual-time-budget=30000",
                    f"--screenshot={path}", url], check=True, capture_output=True, timeout=180)
    print(f"wrote {path.relative_to(REPO)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log-dir", type=Path, default=REPO / "docs" / "runs",
                        help="folder of the three runs (default: docs/runs, not committed)")
    parser.add_argument("--max-epochs", type=int, default=None, help="shorter runs (default: the config's 15)")
    parser.add_argument("--skip-training", action="store_true", help="screenshot the runs already in --log-dir")
    parser.add_argument("--browser", default=None, help="Chromium binary (default: looked up on PATH)")
    args = parser.parse_args()

    browser = args.browser or next(filter(None, map(shutil.which, ("chromium", "chromium-browser",
                                                                    "google-chrome"))), None)
    if browser is None:
        raise SystemExit("no Chromium found: install it (`apt-get install chromium`) or pass --browser PATH")
    log_dir = args.log_dir.resolve()
    if not args.skip_training:
        if log_dir.exists() and any(log_dir.rglob("events.out.tfevents.*")):
            raise SystemExit(f"{log_dir} already holds runs; remove it or pass --skip-training")
        log_dir.mkdir(parents=True, exist_ok=True)
        train(log_dir, args.max_epochs)
    port = free_port()
    server = serve(log_dir, port)
    try:
        for name, (page, size, zoom) in SHOTS.items():
            screenshot(browser, f"http://127.0.0.1:{port}/{page}", size, zoom, REPO / "docs" / name)
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
