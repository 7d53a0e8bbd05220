"""Open every page of the built book in headless Chromium, offline, and check what it shows.

Run by ``make test-browser`` (not collected by pytest: it needs a built book and a
browser). The book in ``_build/html`` is served on 127.0.0.1 (a free port); Chromium
(Debian's ``chromium``, driven by Playwright) may reach that server and nothing else:
every other request is aborted by request routing, and Chromium resolves no other name.
For each page, in the light theme:

* no console error and no uncaught exception;
* no failed request (HTTP >= 400 or a network error) and no request to another host;
* every formula typeset by MathJax: no raw ``\\(``, ``\\[`` or ``$$`` in the text outside
  code, no MathJax error box;
* every Mermaid block drawn as an SVG;
* every image loaded (non-zero natural size), Chinese text drawn with a Chinese font;
* no horizontal overflow of the page at 1280 px (code cells scroll inside their box).

Then, switched to the theme's dark mode, figures (images with transparent pixels,
Mermaid diagrams unless the theme inverts them) must sit on a light background, and
table text must keep a contrast ratio of at least 4.5 with its background. The search
page must find "Adam" and "注意力". Pages with a Mermaid diagram are opened once more
from ``file://``, as a reader opening the HTML from disk would. Tables wider than their
column (they scroll sideways inside their box) are listed as notes, not failures.
``--screenshots DIR`` writes a 1280x2000 PNG of every page in both themes, and of its
first diagram and figures.

Every browser step has a timeout, the whole run has a deadline, and the server and the
browser are stopped however the run ends.
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import http.server
import posixpath
import re
import shutil
import signal
import sys
import threading
import time
import urllib.parse
from pathlib import Path

from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
from playwright.sync_api import sync_playwright

VIEWPORT = {"width": 1280, "height": 2000}
STEP_TIMEOUT_MS = 30_000
SEARCHES = ["Adam", "注意力"]

# Runs in the page once MathJax and Mermaid are done: what the reader would see.
_INSPECT_JS = r"""
async () => {
  const images = [...document.images];
  for (const img of images) img.loading = "eager";
  await Promise.all(images.map((img) => img.decode().catch(() => null)));
  const skip = "pre, code, script, style, textarea, mjx-container, .highlight";
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const raw = [];
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const text = node.textContent;
    if (/\\\(|\\\[|\$\$/.test(text) && !node.parentElement.closest(skip)) {
      raw.push(text.trim().slice(0, 80));
    }
  }
  // Chinese text needs a font that has it: without one every character is the same box.
  let tofu = false;
  const cjk = [...document.querySelectorAll("dt, p, li, td, h1, h2, h3, span")].find(
    (e) => /[\u4e00-\u9fff]/.test(e.textContent) && !e.closest(skip));
  if (cjk) {
    const draw = (ch) => {
      const canvas = document.createElement("canvas");
      canvas.width = canvas.height = 40;
      const ctx = canvas.getContext("2d");
      ctx.font = `32px ${getComputedStyle(cjk).fontFamily}`;
      ctx.fillText(ch, 2, 34);
      return ctx.getImageData(0, 0, 40, 40).data.join();
    };
    tofu = draw("注") === draw("意");
  }
  const root = document.documentElement;
  const width = root.clientWidth;
  // Innermost elements that stick out of the window, to say what overflows.
  const wide = [...document.body.querySelectorAll("*")].filter((e) => {
    const r = e.getBoundingClientRect();
    const out = (c) => c.getBoundingClientRect().right > width + 1;
    return out(e) && r.width > 0 && ![...e.children].some(out);
  }).slice(0, 3).map((e) => {
    const text = (e.textContent || "").trim().slice(0, 40);
    return `<${e.tagName.toLowerCase()} class="${e.className}"> ${text}`;
  });
  return {
    formulas: document.querySelectorAll("mjx-container").length,
    // A TeX error box, or an undefined macro (MathJax prints its name in red).
    mathErrors: [...document.querySelectorAll("mjx-merror, mjx-assistive-mml mtext[mathcolor=red]")]
      .map((e) => e.textContent.slice(0, 80)),
    raw: raw.slice(0, 5),
    tofu,
    diagrams: document.querySelectorAll("pre.mermaid").length,
    undrawn: [...document.querySelectorAll("pre.mermaid")]
      .filter((e) => !e.querySelector("svg")).length,
    images: images.length,
    broken: images.filter((i) => !i.complete || i.naturalWidth === 0).map((i) => i.src),
    overflow: Math.max(root.scrollWidth, document.body.scrollWidth) - width,
    scrolledTables: [...document.querySelectorAll("article table")]
      .filter((t) => t.scrollWidth > t.parentElement.clientWidth + 1)
      .map((t) => (t.querySelector("th, td") || t).textContent.trim().slice(0, 30)),
    wide,
  };
}
"""

# Dark theme: figures on a light background, table text with enough contrast.
_DARK_JS = r"""
() => {
  const rgba = (c) => (c.match(/[\d.]+/g) || [0, 0, 0, 0]).map(Number).concat([1]).slice(0, 4);
  const background = (el) => {
    for (let e = el; e; e = e.parentElement) {
      const c = rgba(getComputedStyle(e).backgroundColor);
      if (c[3] > 0.5) return c;
    }
    return rgba(getComputedStyle(document.body).backgroundColor);
  };
  const lum = (c) => {
    const l = c.slice(0, 3).map((v) => v / 255)
      .map((v) => (v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4));
    return 0.2126 * l[0] + 0.7152 * l[1] + 0.0722 * l[2];
  };
  const contrast = (a, b) => (Math.max(lum(a), lum(b)) + 0.05) / (Math.min(lum(a), lum(b)) + 0.05);
  const transparent = (img) => {
    const canvas = document.createElement("canvas");
    const w = (canvas.width = Math.min(img.naturalWidth, 400));
    const h = (canvas.height = Math.min(img.naturalHeight, 400));
    if (!w || !h) return false;
    const ctx = canvas.getContext("2d");
    ctx.drawImage(img, 0, 0, w, h);
    const data = ctx.getImageData(0, 0, w, h).data;
    for (let i = 3; i < data.length; i += 4) if (data[i] < 250) return true;
    return false;
  };
  const problems = [];
  const article = document.querySelector("article") || document.body;
  if (document.documentElement.dataset.theme !== "dark") problems.push("dark theme not applied");
  for (const img of article.querySelectorAll("img")) {
    if (img.closest("a.headerlink")) continue;
    if (transparent(img) && lum(background(img)) < 0.6) {
      const file = img.src.split("/").pop();
      problems.push(`figure with transparent background on a dark page: ${file}`);
    }
  }
  // Mermaid draws for a light page; the theme inverts its SVGs in dark mode.
  for (const svg of article.querySelectorAll("pre.mermaid svg")) {
    const inverted = /invert\(/.test(getComputedStyle(svg).filter);
    if (!inverted && lum(background(svg)) < 0.6) {
      problems.push("Mermaid diagram drawn for a light page on a dark background");
    }
  }
  for (const cell of article.querySelectorAll("table td, table th")) {
    if (!cell.textContent.trim() || !cell.offsetParent) continue;
    const ratio = contrast(rgba(getComputedStyle(cell).color), background(cell));
    if (ratio < 4.5) {
      const text = cell.textContent.trim().slice(0, 30);
      problems.push(`table cell "${text}": contrast ${ratio.toFixed(1)} with its background`);
      break;
    }
  }
  return problems;
}
"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass


def _start_server(root: Path) -> http.server.ThreadingHTTPServer:
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _redirect_target(root: Path, name: str) -> str | None:
    """Where a redirect stub (Jupyter Book's root index.html) sends the reader, if it is one."""
    html = (root / name).read_text()
    match = re.search(r'http-equiv="refresh" content="\d+; url=([^"]+)"', html, re.I)
    return match and posixpath.normpath(posixpath.join(posixpath.dirname(name), match[1]))


def _pages(root: Path) -> list[str]:
    """Every HTML page of the build (not the theme's and extensions' static files)."""
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.html")
        if not any(part.startswith("_") for part in p.relative_to(root).parts)
    )


class _Page:
    """One browser tab that records console errors and bad requests while it is open."""

    def __init__(self, context, allowed_origin: str):
        self.allowed = allowed_origin
        self.errors: list[str] = []
        self.page = context.new_page()
        self.page.set_default_timeout(STEP_TIMEOUT_MS)
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        self.page.on("requestfailed", self._on_failed)
        self.page.on("response", self._on_response)
        self.page.route("**/*", self._route)

    def _on_console(self, message):
        if message.type == "error":
            self.errors.append(f"console: {message.text[:200]}")

    def _on_failed(self, request):
        self.errors.append(f"request failed: {request.url[:150]} ({request.failure})")

    def _on_response(self, response):
        if response.status >= 400:
            self.errors.append(f"HTTP {response.status}: {response.url[:150]}")

    def _route(self, route):
        url = route.request.url
        if url.startswith(self.allowed) or url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            self.errors.append(f"off-host request blocked: {url[:150]}")
            route.abort("blockedbyclient")

    def open(self, url: str) -> None:
        self.page.goto(url, wait_until="load", timeout=2 * STEP_TIMEOUT_MS)
        self.page.evaluate(
            "async () => { if (window.MathJax && MathJax.startup) await MathJax.startup.promise; }"
        )
        try:  # a diagram that never appears is reported by the inspection that follows
            self.page.wait_for_function(
                "() => [...document.querySelectorAll('pre.mermaid')]"
                ".every((e) => e.querySelector('svg') || e.dataset.processed)",
                timeout=STEP_TIMEOUT_MS / 2,
            )
        except PlaywrightTimeoutError:
            pass

    def close(self) -> None:
        self.page.close()


def _attempt(context, origin: str, check, *args) -> list[str]:
    """``check(page, *args)`` in a new tab: a timeout or a crash is a problem; the tab closes."""
    page = _Page(context, origin)
    try:
        return check(page, *args)
    except Exception as exc:
        return [f"{type(exc).__name__}: {str(exc)[:300]}"]
    finally:
        page.close()


def _check_light(page: _Page, url: str) -> tuple[list[str], dict]:
    page.open(url)
    seen = page.page.evaluate(_INSPECT_JS)
    problems = list(page.errors)
    if seen["raw"]:
        problems.append(f"raw TeX in the text: {seen['raw']}")
    if seen["tofu"]:
        problems.append("Chinese text drawn as empty boxes: no Chinese font (fonts-wqy-microhei)")
    if seen["mathErrors"]:
        problems.append(f"MathJax errors: {seen['mathErrors'][:3]}")
    if seen["undrawn"]:
        problems.append(f"{seen['undrawn']} of {seen['diagrams']} Mermaid blocks not drawn")
    if seen["broken"]:
        problems.append(f"images not loaded: {seen['broken'][:3]}")
    if seen["overflow"] > 1:
        problems.append(
            f"page {seen['overflow']} px wider than the 1280 px window: {seen['wide']}"
        )
    return problems, seen


def _check_disk(page: _Page, url: str) -> list[str]:
    return _check_light(page, url)[0]


def _check_search(page: _Page, base: str, term: str) -> list[str]:
    page.open(f"{base}/search.html?q={urllib.parse.quote(term)}")
    page.page.wait_for_function(
        "() => { const s = document.querySelector('#search-results .search-summary');"
        " return s && s.textContent.trim().length > 0"
        " && !/Preparing|Searching/.test(s.textContent); }"
    )
    hits = page.page.locator("#search-results ul.search > li").count()
    return list(page.errors) + ([] if hits else [f"search for {term!r} found nothing"])


def run(
    root: Path, chromium: str, screenshots: Path | None, deadline: float, only: str = "*"
) -> int:
    pages = [p for p in _pages(root) if fnmatch.fnmatch(p, only)]
    failures: dict[str, list[str]] = {}
    notes: list[str] = []  # worth a look, not a failure
    server = _start_server(root)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    start = time.monotonic()
    if screenshots:
        screenshots.mkdir(parents=True, exist_ok=True)

    def shot(page: _Page, name: str) -> None:
        """The top 1280x2000 of the page, and its first diagram and first figures apart."""
        if not screenshots:
            return
        page.page.evaluate("window.scrollTo(0, 0)")
        page.page.screenshot(path=str(screenshots / name))
        parts = {"mermaid": "pre.mermaid", "figure": "article .cell_output img, article figure img"}
        for label, selector in parts.items():
            for i, element in enumerate(page.page.locator(selector).all()[:2]):
                element.scroll_into_view_if_needed()
                element.screenshot(path=str(screenshots / name.replace(".png", f".{label}{i}.png")))

    def record(label: str, problems: list[str]) -> None:
        print(f"{'FAIL' if problems else 'ok':4} {label}", flush=True)
        if problems:
            failures[label] = problems

    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=chromium,
                headless=True,
                timeout=STEP_TIMEOUT_MS * 2,
                # Belt and braces beside the routing: no name but loopback resolves.
                args=["--no-sandbox", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"],
            )
            try:
                # A first visit: nothing stored, the system's light colour scheme.
                context = browser.new_context(
                    viewport=VIEWPORT, color_scheme="light", service_workers="block"
                )
                for name in pages:
                    if time.monotonic() - start > deadline:
                        failures["(deadline)"] = [f"stopped after {deadline:.0f} s"]
                        break
                    target = _redirect_target(root, name)
                    if target is not None:
                        ok = target in pages
                        print(f"{'ok' if ok else 'FAIL':4} {name}  (redirects to {target})")
                        if not ok:
                            failures[name] = [f"redirects to a missing page: {target}"]
                        continue
                    t0 = time.monotonic()
                    page = _Page(context, base)
                    try:
                        problems, seen = _check_light(page, f"{base}/{name}")
                        shot(page, name.replace("/", "__").replace(".html", ".png"))
                        # The theme's dark mode, as its toggle sets it.
                        page.page.evaluate(
                            "() => { const d = document.documentElement.dataset;"
                            " d.theme = 'dark'; d.mode = 'dark'; }"
                        )
                        problems += page.page.evaluate(_DARK_JS)
                        shot(page, name.replace("/", "__").replace(".html", "-dark.png"))
                    except Exception as exc:  # a timeout or a crashed page: report, go on
                        problems = [f"{type(exc).__name__}: {str(exc)[:300]}"]
                        seen = {}
                    finally:
                        page.close()
                    problems = list(dict.fromkeys(problems + page.errors))
                    for table in seen.get("scrolledTables", []):
                        notes.append(f"{name}: table {table!r} scrolls sideways inside its box")
                    status = "FAIL" if problems else "ok"
                    print(
                        f"{status:4} {name}  ({time.monotonic() - t0:.1f} s; "
                        f"{seen.get('formulas', 0)} formulas, {seen.get('diagrams', 0)} diagrams, "
                        f"{seen.get('images', 0)} images)",
                        flush=True,
                    )
                    if problems:
                        failures[name] = problems
                for term in SEARCHES if only == "*" else []:
                    record(f"search {term!r}", _attempt(context, base, _check_search, base, term))
                # From disk, as a reader opening _build/html/index.html would.
                for name in [p for p in pages if 'class="mermaid"' in (root / p).read_text()]:
                    url = (root / name).resolve().as_uri()
                    disk = root.resolve().as_uri()
                    record(f"file:// {name}", _attempt(context, disk, _check_disk, url))
            finally:
                browser.close()
    finally:
        server.shutdown()
        server.server_close()
    if notes:
        print("\nNotes (not failures):\n" + "\n".join(f"  - {note}" for note in notes))
    for name, problems in failures.items():
        print(f"\n{name}:")
        for problem in problems:
            print(f"  - {problem}")
    print(
        f"\n{len(pages)} pages, {len(failures)} with problems, "
        f"{time.monotonic() - start:.0f} s in the browser"
    )
    return 1 if failures else 0


def _on_sigterm(signum, frame):
    raise SystemExit(f"stopped by signal {signum}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path, nargs="?", default=Path("_build/html"))
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--screenshots", type=Path, help="write a PNG of every page here")
    parser.add_argument("--pages", default="*", help="only pages matching this glob")
    parser.add_argument("--deadline", type=float, default=900, help="seconds for all pages")
    args = parser.parse_args()
    if not (args.html / "index.html").is_file():
        raise SystemExit(f"no built book in {args.html}: run `make book` first")
    signal.signal(signal.SIGTERM, _on_sigterm)  # `timeout` still closes browser and server
    sys.exit(run(args.html, args.chromium, args.screenshots, args.deadline, args.pages))


if __name__ == "__main__":
    main()
