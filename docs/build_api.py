"""Build the API reference from the docstrings with pdoc (the ``test`` extra installs it)::

    python docs/build_api.py            # writes docs/api/index.html (not committed)
    python docs/build_api.py -o /tmp/api

Every public module of ``lightning_advsel`` gets a page (the package's ``__all__`` names its classes and functions,
not its submodules, so pdoc alone would document the top-level module only). The build fails on any warning from
pdoc and on any docstring reference (``:func:`name```, ``:class:`...```, ``:mod:`...```) that names nothing, so a
renamed function cannot leave a stale reference behind.
"""

from __future__ import annotations

import argparse
import pkgutil
import re
import sys
import warnings
from pathlib import Path

import pdoc
import pdoc.doc
import pdoc.render

PACKAGE = "lightning_advsel"
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "api"
REFERENCE = re.compile(r":(?:py:)?(?:mod|func|class|meth|attr|exc|data|const|obj):`~?([^`]+)`")


def public_modules() -> list[str]:
    """The package and its submodules, except private ones (a ``_`` at the start of any part of the name)."""
    package = pkgutil.resolve_name(PACKAGE)
    found = pkgutil.walk_packages(package.__path__, f"{PACKAGE}.")
    return [PACKAGE, *sorted(m.name for m in found if not any(p.startswith("_") for p in m.name.split(".")))]


def _resolves(name: str, module: str, qualname: str) -> bool:
    """Whether ``name``, written in the docstring of ``module.qualname``, names an object.

    Looked up as Python would read it there: in the enclosing classes, the module, the package, or fully qualified.
    """
    parts = qualname.split(".") if qualname else []
    scopes = [".".join([module, *parts[:i]]) for i in range(len(parts), -1, -1)]
    for scope in [*scopes, PACKAGE, ""]:
        try:
            pkgutil.resolve_name(f"{scope}.{name}" if scope else name)
        except (ImportError, AttributeError, ValueError):
            continue
        return True
    return False


def broken_references(modules: list[pdoc.doc.Module]) -> list[str]:
    """``"<object>: <reference>"`` for each docstring reference in ``modules`` that names nothing.

    Only docstrings written in these modules are read: one a class inherits from Lightning is Lightning's.
    """
    broken = []
    for module in modules:
        for doc in [module, *module.flattened_own_members]:
            own = doc.docstring if isinstance(doc, pdoc.doc.Variable | pdoc.doc.Module) else doc.obj.__doc__
            where, qualname = doc.taken_from
            for name in REFERENCE.findall(own or ""):
                if not _resolves(name.removesuffix("()"), where, qualname):
                    broken.append(f"{doc.fullname}: {name}")
    return broken


def build(output: Path, modules: list[str] | None = None) -> list[Path]:
    """Write the HTML reference of ``modules`` (default: :func:`public_modules`) into ``output``; its pages.

    Raises:
        RuntimeError: listing pdoc's warnings and the broken docstring references, if there are any.
    """
    modules = public_modules() if modules is None else modules
    pdoc.render.configure(docformat="google", search=True, show_source=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(*modules, output_directory=output)
        docs = [pdoc.doc.Module.from_name(name) for name in modules]
    pdoc_dir = Path(pdoc.__file__).parent
    problems = [f"pdoc: {w.message}" for w in caught if Path(w.filename).is_relative_to(pdoc_dir)]
    problems += [f"broken reference in {ref}" for ref in broken_references(docs)]
    if problems:
        raise RuntimeError("API reference: " + "; ".join(problems))
    return sorted(output.rglob("*.html"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT, help="folder for the HTML pages")
    pages = build(parser.parse_args().output)
    print(f"{len(pages)} pages in {pages[0].parent if pages else '-'}", file=sys.stderr)


if __name__ == "__main__":
    main()
