"""The YAML configs shipped inside the package, found by name as well as by path.

``lightning_advsel/configs/`` travels in the wheel (the repository's top-level ``configs/`` links to it), so a run
needs no clone: a ``--config`` value that is not an existing file is looked up there, with or without its
``configs/`` prefix and ``.yaml`` suffix. ``digits/base``, ``digits/base.yaml`` and ``configs/digits/base.yaml``
name the same file; a file that exists at the given path always wins over a shipped one.
"""

from __future__ import annotations

from difflib import SequenceMatcher
from pathlib import Path, PurePosixPath

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CONFIG_OPTIONS = ("--config", "-c")
SUFFIX = ".yaml"
PREFIX = "configs"  # the repository's folder, so that README commands run the same from a clone and a wheel
MAX_CLOSE = 5  # names suggested for an unknown one
MIN_SIMILARITY = 0.6  # difflib ratio, of the whole name or of its file stem


def names() -> list[str]:
    """The shipped configs' names, sorted: their paths under ``configs/`` without ``.yaml``, e.g. ``digits/base``."""
    return sorted(p.relative_to(CONFIG_DIR).with_suffix("").as_posix() for p in CONFIG_DIR.rglob(f"*{SUFFIX}"))


def _is_inline(value: str) -> bool:
    # jsonargparse also reads a config given as YAML or JSON text; no file name or config name holds these.
    return any(mark in value for mark in (":", "{", "\n", " "))


def _name(value: str) -> str:
    parts = PurePosixPath(value).parts
    if parts[:1] == (PREFIX,):
        parts = parts[1:]
    return PurePosixPath(*parts).as_posix().removesuffix(SUFFIX) if parts else value


def close_names(name: str, known: list[str]) -> list[str]:
    """Up to ``MAX_CLOSE`` of ``known`` that look like ``name`` (as a whole or by file stem), closest first."""

    def similarity(candidate: str) -> float:
        whole = SequenceMatcher(None, name, candidate).ratio()
        stem = SequenceMatcher(None, name.rsplit("/", 1)[-1], candidate.rsplit("/", 1)[-1]).ratio()
        return max(whole, stem)

    scored = sorted(((similarity(c), c) for c in known), key=lambda sc: -sc[0])
    return [c for score, c in scored[:MAX_CLOSE] if score >= MIN_SIMILARITY]


def resolve(value: str) -> str:
    """The file a ``--config`` value names: ``value`` itself if it is a file (or YAML text), else the shipped config.

    Raises:
        FileNotFoundError: naming ``value`` and the closest shipped names, when it is neither a file nor a
            shipped config.
    """
    if Path(value).is_file() or _is_inline(value):
        return value
    name = _name(value)
    shipped = CONFIG_DIR / f"{name}{SUFFIX}"
    if shipped.is_file():
        return str(shipped)
    known = names()
    close = close_names(name, known) or known
    raise FileNotFoundError(f"`--config` {value!r} is neither a file nor a shipped config; did you mean "
                            f"{', '.join(close)}? (`lightning-advsel configs` lists them all)")


def resolve_args(args: list[str]) -> list[str]:
    """``args`` with every ``--config``/``-c`` value (``--config X`` or ``--config=X``) replaced by :func:`resolve`.

    Raises:
        FileNotFoundError: see :func:`resolve`.
    """
    resolved = list(args)
    for i, arg in enumerate(args):
        if arg in CONFIG_OPTIONS and i + 1 < len(args):
            resolved[i + 1] = resolve(args[i + 1])
        elif arg.startswith("--config="):
            resolved[i] = "--config=" + resolve(arg.split("=", 1)[1])
    return resolved


def _summary(path: Path) -> str:
    """The first line of a config's leading comment."""
    first = path.read_text().partition("\n")[0]
    return first.removeprefix("#").strip() if first.startswith("#") else ""


def listing() -> str:
    """The shipped configs, one per line with the first line of its comment, and where they are."""
    known = names()
    width = max(map(len, known))
    lines = [f"{name:<{width}}  {_summary(CONFIG_DIR / f'{name}{SUFFIX}')}" for name in known]
    return "\n".join([f"Shipped configs, in {CONFIG_DIR}; give them to --config/-c by name, e.g. "
                      "`lightning-advsel fit -c digits/base -c recipes/ds`:", *lines])


def help_text() -> str:
    """A short paragraph for ``--help``: the shipped names and how to give them."""
    return (f"Shipped configs (-c NAME, e.g. -c digits/base -c recipes/ds; `lightning-advsel configs` describes "
            f"them, `lightning-advsel configs NAME` prints one): {', '.join(names())}.")


def show(args: list[str]) -> str:
    """What ``lightning-advsel configs [NAME]`` prints: :func:`listing`, or the text of the config ``NAME``.

    Raises:
        FileNotFoundError: see :func:`resolve`.
    """
    if not args:
        return listing() + "\n"
    return Path(resolve(args[0])).read_text()
