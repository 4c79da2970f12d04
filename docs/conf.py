"""The manual: Sphinx with the furo theme, Markdown pages through myst-parser, the API reference from the docstrings
(autodoc, Google style through napoleon). It builds offline: no inventory or font is fetched. One command::

    python -m sphinx -W --keep-going docs docs/_build/html

``-W`` turns every warning into an error, and ``nitpicky`` makes a reference to a name that does not exist a
warning, so a broken link, anchor or docstring reference fails the build (``tests/test_docs.py`` runs it).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS))  # apiref.py, the API reference's extension

import lightning_advsel  # noqa: E402

project = "lightning-advsel"
author = "lightning-advsel contributors"
release = version = lightning_advsel.__version__

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "apiref"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "runs", "README.md"]

# Markdown: GitHub's heading anchors, so `page.md#a-heading` works here and on the code host alike.
myst_heading_anchors = 3

# The API reference: only docstrings written in this package (a hook that overrides Lightning's keeps Lightning's
# docstring there), Google style, members in source order.
autodoc_inherit_docstrings = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_custom_sections = ["Returns", "Yields"]  # prose here, not "type: description"; types are annotations
apiref_package = "lightning_advsel"
nitpicky = True

html_theme = "furo"
html_title = f"lightning-advsel {release}"
html_show_sourcelink = False
pygments_style = "sphinx"


# Files outside docs/ that a page includes whole, by the page that includes them: a link from one to another (RESULTS.md
# to SPEED.md) becomes a link to that page.
INCLUDED = {"benchmarks/RESULTS.md": "results", "benchmarks/SPEED.md": "speed", "CHANGELOG.md": "changelog"}
LINK = re.compile(r"\]\(([^)#\s:]+\.md)(#[^)\s]*)?\)")


def link_included_pages(app, relative_path, parent_docname, content):  # noqa: ANN001, ANN201
    """``include-read``: links between included files point at the pages that include them."""
    folder = (DOCS / relative_path).parent

    def page(match: re.Match) -> str:
        target = os.path.relpath((folder / match[1]).resolve(), DOCS.parent)
        return f"]({INCLUDED[target]}.md{match[2] or ''})" if target in INCLUDED else match[0]

    content[0] = LINK.sub(page, content[0])


def setup(app):  # noqa: ANN001, ANN201
    app.connect("include-read", link_included_pages)
