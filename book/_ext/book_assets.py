"""Serve plotly.js and MathJax from the book's own `_static`, so the built site reads fully offline.

- `plotly.min.js` is copied from the installed plotly package (the exact version that wrote the
  figures) and loaded once per page through `html_js_files` in `_config.yml`.
- MathJax comes from the npm registry's `mathjax` package, fetched once with `npm pack` at a pinned
  version; only the files the page needs (the tex-chtml component, TeX extensions loaded on demand,
  the woff-v2 fonts, the menu and accessibility components) are kept, under `book/_static/mathjax/`.

Both land in `book/_static/`, which git ignores; Sphinx copies them into the build's `_static/`.
Run `python book/_ext/book_assets.py` to fetch them ahead of a build (scripts/setup.sh does).
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

MATHJAX_VERSION = "3.2.2"
STATIC = Path(__file__).resolve().parent.parent / "_static"
MATHJAX_DIR = STATIC / "mathjax"
MATHJAX_STAMP = MATHJAX_DIR / "VERSION"
# Paths inside the package's es5/ directory that the tex-chtml component can load.
MATHJAX_KEEP = ["tex-chtml.js", "input/tex/extensions", "output/chtml/fonts/woff-v2", "ui", "a11y",
                "adaptors"]


def ensure_plotly(static: Path = STATIC) -> Path:
    """Copy the installed plotly's `plotly.min.js` into `static` (when missing or different)."""
    import plotly

    source = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    target = static / "plotly.min.js"
    if not target.exists() or target.read_bytes() != source.read_bytes():
        static.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return target


def ensure_mathjax(target: Path = MATHJAX_DIR, version: str = MATHJAX_VERSION) -> Path:
    """Fetch `mathjax@version` with `npm pack` into `target` unless that version is already there."""
    stamp = target / "VERSION"
    if stamp.exists() and stamp.read_text().strip() == version:
        return target / "tex-chtml.js"
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is needed once to fetch MathJax for the book (apt-get install npm), "
                           f"or put the es5/ files of mathjax@{version} under {target}")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([npm, "pack", f"mathjax@{version}", "--pack-destination", tmp, "--silent"],
                       check=True, cwd=tmp, stdout=subprocess.DEVNULL)
        tarball = next(Path(tmp).glob("mathjax-*.tgz"))
        with tarfile.open(tarball) as tar:
            tar.extractall(tmp, filter="data")
        es5 = Path(tmp) / "package" / "es5"
        if target.exists():
            shutil.rmtree(target)
        for rel in MATHJAX_KEEP:
            src, dst = es5 / rel, target / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst)
            else:
                shutil.copyfile(src, dst)
        shutil.copyfile(Path(tmp) / "package" / "LICENSE", target / "LICENSE")
    stamp.write_text(version + "\n")
    return target / "tex-chtml.js"


def _fetch_assets(app) -> None:
    ensure_plotly()
    ensure_mathjax()


def setup(app):
    app.connect("builder-inited", _fetch_assets)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


if __name__ == "__main__":
    print(ensure_plotly())
    print(ensure_mathjax())
