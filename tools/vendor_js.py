"""The book's own copies of MathJax and Mermaid: where they come from, and a check.

The rendered book loads no script, stylesheet or font from outside ``_build/html``: the
few files of MathJax 3 and Mermaid 11 that it needs are committed under
``book/_static/mathjax/`` and ``book/_static/mermaid/``, each package's licence beside
them. This script is how they got there and how anyone can check that they are exactly
the registry's files:

    python tools/vendor_js.py           # re-fetch the pinned npm tarballs (npm pack), extract
    python tools/vendor_js.py --check   # compare the committed files with the manifest

Fetching (needs ``npm``; reading and building the book do not) verifies each tarball
against the SHA-512 ``integrity`` value the npm registry publishes for that version
(``npm view NAME@VERSION dist.integrity``), writes only the files listed in ``PACKAGES``
and checks each one against its SHA-256 in ``book/_static/vendor.sha256`` (which
``--write-manifest`` rewrites after a version change); ``--check`` needs no network.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import subprocess
import tarfile
import tempfile
from pathlib import Path

STATIC = Path(__file__).resolve().parent.parent / "book" / "_static"

_WOFF = "output/chtml/fonts/woff-v2/"
_MATHJAX_FONTS = [
    "MathJax_AMS-Regular", "MathJax_Calligraphic-Bold", "MathJax_Calligraphic-Regular",
    "MathJax_Fraktur-Bold", "MathJax_Fraktur-Regular", "MathJax_Main-Bold",
    "MathJax_Main-Italic", "MathJax_Main-Regular", "MathJax_Math-BoldItalic",
    "MathJax_Math-Italic", "MathJax_Math-Regular", "MathJax_SansSerif-Bold",
    "MathJax_SansSerif-Italic", "MathJax_SansSerif-Regular", "MathJax_Script-Regular",
    "MathJax_Size1-Regular", "MathJax_Size2-Regular", "MathJax_Size3-Regular",
    "MathJax_Size4-Regular", "MathJax_Typewriter-Regular", "MathJax_Vector-Bold",
    "MathJax_Vector-Regular", "MathJax_Zero",
]
# TeX packages that MathJax's autoload fetches on first use of one of their macros
# (\boldsymbol, \cancel, \color, \bbox, \braket, \numcases, \coloneqq, ...). The book's
# pages use only what tex-chtml.js contains (base, ams, newcommand); these few are here so
# that a new chapter using them still renders offline. The browser check reports any other
# file MathJax asks for.
_TEX_EXTENSIONS = ["bbox", "boldsymbol", "braket", "cancel", "cases", "color", "mathtools"]

# npm package -> version, SHA-512 integrity of its tarball, {file in tarball: destination}.
PACKAGES = {
    "mathjax": {
        "version": "3.2.2",
        "integrity": "sha512-Bt+SSVU8eBG27zChVewOicYs7Xsdt40qm4+UpHyX7k0/O9NliPc+x77k1/"
        "FEsPsjKPZGJvtRZM1vO+geW0OhGw==",
        "files": {
            "package/LICENSE": "mathjax/LICENSE",
            "package/es5/tex-chtml.js": "mathjax/tex-chtml.js",
            **{f"package/es5/{_WOFF}{f}.woff": f"mathjax/{_WOFF}{f}.woff" for f in _MATHJAX_FONTS},
            **{
                f"package/es5/input/tex/extensions/{e}.js": f"mathjax/input/tex/extensions/{e}.js"
                for e in _TEX_EXTENSIONS
            },
        },
    },
    "mermaid": {
        "version": "11.12.1",
        "integrity": "sha512-UlIZrRariB11TY1RtTgUWp65tphtBv4CSq7vyS2ZZ2TgoMjs2nloq+"
        "wFqxiwcxlhHUvs7DPGgMjs2aeQxz5h9g==",
        "files": {
            "package/LICENSE": "mermaid/LICENSE",
            "package/dist/mermaid.min.js": "mermaid/mermaid.min.js",
        },
    },
}

# SHA-256 of every file written, in `sha256sum -c` format, relative to book/_static.
MANIFEST = STATIC / "vendor.sha256"


def manifest() -> dict[str, str]:
    lines = MANIFEST.read_text().splitlines()
    return {name: digest for digest, name in (line.split("  ", 1) for line in lines)}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(name: str, spec: dict) -> None:
    """Download one pinned tarball (`npm pack`), verify its integrity, extract the listed files."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            ["npm", "pack", "--silent", f"{name}@{spec['version']}", "--pack-destination", tmp],
            check=True, timeout=300, stdout=subprocess.DEVNULL,
        )
        (tarball,) = Path(tmp).glob("*.tgz")
        data = tarball.read_bytes()
    algorithm, _, expected = spec["integrity"].partition("-")
    digest = base64.b64encode(hashlib.new(algorithm, data).digest()).decode()
    if digest != expected:
        raise SystemExit(f"{name}@{spec['version']}: {algorithm} {digest}, pinned {expected}")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member, destination in spec["files"].items():
            target = STATIC / destination
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
    print(f"{name}@{spec['version']}: {len(spec['files'])} files")


def check() -> list[str]:
    """Return the problems: committed files missing or not byte-identical to the manifest."""
    problems = []
    expected_digests = manifest()
    for relative, expected in expected_digests.items():
        path = STATIC / relative
        if not path.is_file():
            problems.append(f"missing: {path}")
        elif _sha256(path) != expected:
            problems.append(f"differs from the pinned package: {path}")
    listed = {d for spec in PACKAGES.values() for d in spec["files"].values()}
    if listed != set(expected_digests):
        problems.append(f"PACKAGES and {MANIFEST.name} list different files")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only verify the committed files")
    parser.add_argument(
        "--write-manifest", action="store_true", help=f"after fetching, rewrite {MANIFEST.name}"
    )
    args = parser.parse_args()
    if not args.check:
        for name, spec in PACKAGES.items():
            fetch(name, spec)
        if args.write_manifest:
            files = sorted(d for spec in PACKAGES.values() for d in spec["files"].values())
            MANIFEST.write_text("".join(f"{_sha256(STATIC / f)}  {f}\n" for f in files))
    problems = check()
    if problems:
        raise SystemExit("\n".join(problems))
    size = sum((STATIC / relative).stat().st_size for relative in manifest())
    print(f"{len(manifest())} vendored files match their pinned packages ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
