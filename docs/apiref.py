"""The manual's API reference: a page per public module, written from the package itself when the build starts, and
references resolved as Python would read them.

A Sphinx extension (``docs/conf.py`` loads it). Three parts:

* :func:`write_pages` walks the package named by ``apiref_package`` and writes ``api/<module>.md`` for every public
  module (no ``_`` at the start of any part of its name): the module's docstring, then each public name defined
  there (``__all__`` where the module has one) under ``autoclass`` or ``autofunction``, or for a variable as
  ``py:data`` with the comment that describes it in the source (autodata would show its type's docstring). A name the
  module only re-exports is listed with a link to the module that defines it, so nothing is documented twice.
  The pages are generated, never edited (``docs/api/`` is git-ignored), so a new module or function cannot be
  left out of the reference.
* :func:`resolve_as_python` answers the Python references that Sphinx finds no target for (docstrings say
  :func:`unpack` in a module that imports it; annotations name ``torch.Tensor``): the name is looked up as Python
  would read it there (enclosing classes, module, package, fully qualified). A name that is documented here under
  the module that defines it gets a link; a real object outside the package (torch, Lightning) is shown unlinked;
  a name that is nothing is left to Sphinx, whose ``nitpicky`` warning fails a build run with ``-W``.
* :func:`link_inline_code` links inline code in the Markdown pages that names a documented object
  (`` `lightning_advsel.evaluation.autoattack` ``, `` `AdversarialSelectionModule` ``) to its entry, so the pages
  stay plain Markdown that reads well on the code host and still cross-link to the reference.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.pycode import ModuleAnalyzer
from sphinx.util.nodes import make_refnode

_MISSING = object()
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def public_modules(package: str) -> list[str]:
    """``package`` and its submodules, except private ones (a ``_`` at the start of any part of the name)."""
    root = importlib.import_module(package)
    if not hasattr(root, "__path__"):  # a single module
        return [package]
    found = pkgutil.walk_packages(root.__path__, f"{package}.")
    return [package, *sorted(m.name for m in found if not any(p.startswith("_") for p in m.name.split(".")))]


def defined_names(module: str) -> list[tuple[str, str]]:
    """``(name, kind)`` of each public top-level class, function and variable that ``module``'s own source
    defines, in source order, restricted to its ``__all__`` where it has one; kind is ``class``, ``function`` or
    ``data``."""
    mod = importlib.import_module(module)
    tree = ast.parse(Path(mod.__file__).read_text())
    found: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            found.setdefault(node.name, "class")
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            found.setdefault(node.name, "function")
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    found.setdefault(target.id, "data")
    listed = getattr(mod, "__all__", None)
    return [(name, kind) for name, kind in found.items()
            if not name.startswith("_") and name != "__all__" and (listed is None or name in listed)]


def reexported_names(module: str) -> list[str]:
    """The names of ``module``'s ``__all__`` that another module defines."""
    own = {name for name, _ in defined_names(module)}
    return [name for name in getattr(importlib.import_module(module), "__all__", []) if name not in own]


def home(obj: object) -> str | None:
    """``module.qualname`` where ``obj`` (a class or function) is defined, else ``None``."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    return f"{module}.{qualname}" if isinstance(module, str) and isinstance(qualname, str) else None


def comment(module: str, name: str) -> str:
    """The comment that describes the module-level variable ``name``: ``#:`` lines or a docstring after it (what
    autodoc reads), else the comment at the end of its assignment's first line or the comment lines just above."""
    docs = ModuleAnalyzer.for_module(module).find_attr_docs()
    if ("", name) in docs:
        return " ".join(line.strip() for line in docs["", name] if line.strip())
    source = Path(importlib.import_module(module).__file__).read_text().splitlines()
    for node in ast.parse("\n".join(source)).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) \
            else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            first = source[node.lineno - 1]
            if "  # " in first:
                return first.split("  # ", 1)[1].strip()
            above = []
            for line in reversed(source[:node.lineno - 1]):
                if not line.startswith("# "):
                    break
                above.insert(0, line[2:].strip())
            return " ".join(above)
    return ""


def _rst_text(text: str) -> str:
    """A source comment as reStructuredText: `code` spans as literals, other markup characters taken literally."""
    parts = re.split(r"`([^`]+)`", text)
    return "".join(f"``{part}``" if i % 2 else re.sub(r"([*|_\\])", r"\\\1", part) for i, part in enumerate(parts))


def _page(module: str) -> str:
    directive = {"class": "autoclass", "function": "autofunction"}
    lines = [f"# `{module}`", "", "```{eval-rst}", f".. automodule:: {module}", "   :no-members:", ""]
    for name, kind in defined_names(module):
        if kind == "data":  # autodata would show the docstring of the value's type (tuple's, dict's)
            lines += [f".. py:data:: {name}", f"   :module: {module}", "", f"   {_rst_text(comment(module, name))}", ""]
            continue
        lines += [f".. {directive[kind]}:: {module}.{name}"]
        if kind == "class":
            lines += ["   :members:", "   :show-inheritance:"]
        lines += [""]
    lines += ["```", ""]
    reexports = reexported_names(module)
    if reexports:
        mod = importlib.import_module(module)
        lines += ["Also importable from here, documented where they are defined:", ""]
        for name in reexports:
            obj = getattr(mod, name)
            summary = (getattr(obj, "__doc__", None) or "").strip().split("\n\n", 1)[0] if home(obj) else ""
            summary = re.sub(r":(?:py:)?(\w+):`", r"{py:\1}`", " ".join(summary.split()))  # roles in Markdown
            link = f"{{py:obj}}`{name} <{defined_in(obj, name, module)}.{name}>`"
            lines += [f"- {link}: {summary}" if summary else f"- {link}"]
        lines += [""]
    return "\n".join(lines)


def defined_in(obj: object, name: str, module: str) -> str:
    """The module whose source defines ``obj`` (re-exported from ``module`` as ``name``)."""
    if home(obj):
        return obj.__module__
    package = module.split(".", 1)[0]
    for candidate in public_modules(package):
        if any(n == name for n, _ in defined_names(candidate)) and getattr(
                importlib.import_module(candidate), name, None) is obj:
            return candidate
    return module


def _write(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:  # an unchanged page keeps its time: no rebuild
        path.write_text(text)


def write_pages(app: Sphinx) -> None:
    """``api/index.md`` and one page per public module of ``app.config.apiref_package``, under the source folder."""
    package = app.config.apiref_package
    folder = Path(app.srcdir) / "api"
    folder.mkdir(exist_ok=True)
    modules = public_modules(package)
    for module in modules:
        _write(folder / f"{module}.md", _page(module))
    for stale in set(folder.glob("*.md")) - {folder / f"{m}.md" for m in modules} - {folder / "index.md"}:
        stale.unlink()
    index = ["# API reference", "",
             f"Generated from the docstrings of `{package}` when the manual is built: a page per public module.", "",
             "```{toctree}", ":maxdepth: 1", "", *modules, "```", ""]
    _write(folder / "index.md", "\n".join(index))


def lookup(name: str, module: str | None = None, classname: str | None = None) -> object:
    """The object ``name`` names when written in ``module`` (inside class ``classname``), or ``_MISSING``: tried in
    the enclosing classes, the module, its package, the builtins and as a fully qualified name."""
    parts = classname.split(".") if classname else []
    scopes = [".".join([module, *parts[:i]]) for i in range(len(parts), -1, -1)] if module else []
    if module and "." in module:
        scopes.append(module.split(".", 1)[0])
    for scope in [*scopes, "builtins", ""]:
        try:
            return pkgutil.resolve_name(f"{scope}.{name}" if scope else name)
        except (ImportError, AttributeError, ValueError):
            continue
    return _MISSING


def _documented(env, obj: object, *names: str):  # noqa: ANN001, ANN202
    """The Python domain's entry of ``obj``: under the module that defines it, or one of ``names``."""
    objects = env.get_domain("py").objects
    for candidate in (home(obj), *names):
        if candidate in objects:
            return candidate, objects[candidate]
    for fullname, entry in objects.items():  # a module-level value (a dict of recipes) has no name of its own
        if entry.objtype == "data" and lookup(fullname) is obj:
            return fullname, entry
    return None


def resolve_as_python(app: Sphinx, env, node, contnode):  # noqa: ANN001, ANN201
    """``missing-reference``: a Python reference Sphinx found no target for, resolved as Python reads it."""
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].removesuffix("()")
    obj = lookup(target, node.get("py:module"), node.get("py:class"))
    if obj is _MISSING:
        return None  # names nothing: Sphinx warns (nitpicky), and -W fails the build
    found = _documented(env, obj, target, f"{node.get('py:module')}.{target}")
    if found is None:
        return contnode  # a real object that this reference does not document (torch, Lightning, builtins)
    fullname, entry = found
    return make_refnode(app.builder, node["refdoc"], entry.docname, entry.node_id, contnode, fullname)


def link_inline_code(app: Sphinx, doctree: nodes.document, docname: str) -> None:
    """``doctree-resolved``: inline code in a page that names a documented object becomes a link to its entry."""
    if docname.startswith("api/"):
        return
    package = app.config.apiref_package
    short = set(getattr(importlib.import_module(package), "__all__", []))
    for literal in list(doctree.findall(nodes.literal)):
        if isinstance(literal.parent, nodes.reference) or "code" in literal.get("classes", []) and literal.get(
                "language"):
            continue
        text = literal.astext().split("(", 1)[0]
        if not NAME.match(text) or not (text.startswith(f"{package}.") or text in short):
            continue
        obj = lookup(text, package)
        found = None if obj is _MISSING else _documented(app.env, obj, text)
        if found is None:
            continue
        fullname, entry = found
        literal.replace_self(make_refnode(app.builder, docname, entry.docname, entry.node_id, literal.deepcopy(),
                                          fullname))


def keep_prose(app: Sphinx, what: str, name: str, obj: object, options: dict, lines: list[str]) -> None:
    """``autodoc-process-docstring``, before napoleon: a property's or attribute's docstring here is prose, whose
    first colon napoleon would otherwise take as the end of a type (``The rate: ...`` -> type ``The rate``)."""
    if what in ("attribute", "property", "data") and lines and ":" in re.sub(r"``[^`]*``", "", lines[0]):
        lines[:0] = ["..", ""]  # napoleon takes this empty comment as the line to split; it renders as nothing


def setup(app: Sphinx) -> dict:
    app.add_config_value("apiref_package", "lightning_advsel", "env")
    app.connect("builder-inited", write_pages)
    app.connect("autodoc-process-docstring", keep_prose, priority=400)  # napoleon's runs at 500
    app.connect("missing-reference", resolve_as_python)
    app.connect("doctree-resolved", link_inline_code)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
