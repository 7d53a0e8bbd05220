"""Fixes to the built HTML that the browser check (tools/browser_check.py) asked for.

* sphinxcontrib-mermaid 2.x loads Mermaid as an ES module (``import mermaid from ...``),
  from a CDN by default. A browser refuses ES-module imports on pages opened from disk
  (``file://``), so a book read from a USB stick would show empty boxes even with a local
  copy. Here pages with a ``mermaid`` directive get Mermaid's self-contained build
  (``_static/mermaid/mermaid.min.js``, a classic script) and ``_static/mermaid-init.js``,
  which draws every ``pre.mermaid`` with the ``mermaid_init_config`` of ``_config.yml``.
  The directive and its HTML stay the extension's own.
* sphinx-thebe (loaded by Jupyter Book for live-code launch buttons, which this book does
  not have) puts a script naming a CDN on every page, and puts it there twice, which
  throws "Identifier 'THEBE_JS_URL' has already been declared" on every page. Its
  scripts are dropped.
* pydata-sphinx-theme logs "Got invalid theme mode" as a console error on a reader's
  first visit unless its template gets a ``default_mode`` (sphinx-book-theme passes
  none): it gets ``auto`` (follow the system's light or dark setting), which is what the
  theme falls back to after the error anyway.

The first two steps fail the build, rather than fall back to a CDN, if a new version of
either extension no longer has the function replaced here.
"""

from __future__ import annotations

import json

import sphinx_thebe
from sphinxcontrib import mermaid as sphinx_mermaid


def _add_mermaid_scripts(app, pagename, templatename, context, doctree):
    if doctree is None or doctree.next_node(sphinx_mermaid.mermaid) is None:
        return
    config = json.dumps(app.config.mermaid_init_config)
    app.add_js_file(None, body=f"window.bookMermaidConfig = {config};")
    app.add_js_file("mermaid/mermaid.min.js", loading_method="defer")
    app.add_js_file("mermaid-init.js", loading_method="defer")


def _default_mode(app, config):
    config.html_context.setdefault("default_mode", "auto")


def _disconnect(app, event: str, handler) -> None:
    listeners = [x for x in app.events.listeners[event] if x.handler is handler]
    if not listeners:
        raise RuntimeError(f"{handler.__module__}.{handler.__name__} is not connected to {event}")
    for listener in listeners:
        app.disconnect(listener.id)


def setup(app):
    app.setup_extension("sphinxcontrib.mermaid")
    app.setup_extension("sphinx_thebe")
    _disconnect(app, "html-page-context", sphinx_mermaid.install_js)
    _disconnect(app, "env-before-read-docs", sphinx_thebe.init_thebe_core)
    app.connect("html-page-context", _add_mermaid_scripts)
    app.connect("config-inited", _default_mode)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
