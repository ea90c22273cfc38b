"""The book: table of contents, notebook hygiene, a warning-free build, and the pages in a browser.

The browser test builds the book, serves it on 127.0.0.1 and opens every page in headless Chromium
(tests/chromium_cdp.py). It fails when a plotly figure did not draw, math was not typeset, the page
logged a JavaScript error, a request failed, or a request went anywhere but the local server.
Screenshots of every chapter are kept in artifacts/.
"""

from __future__ import annotations

import functools
import http.server
import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import nbformat
import pytest
import yaml
from chromium_cdp import Chromium, find_chromium, in_ci

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
MAX_NOTEBOOK_BYTES = 1_000_000
PLOTLY_HTML = "plotly-graph-div"
# Output types the built site can show; each output needs at least one of them.
SHOWN_MIMES = ("text/html", "text/plain", "text/markdown", "text/latex", "image/png", "image/jpeg",
               "image/svg+xml", "application/vnd.jupyter.widget-view+json")


def toc_files() -> list[str]:
    """Every `file:` of _toc.yml, in order, the root first."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(entries):
        for entry in entries:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("sections", []))

    for part in toc.get("parts", []):
        walk(part["chapters"])
    walk(toc.get("chapters", []))
    return files


CHAPTERS = [ROOT / f"{f}.ipynb" for f in toc_files() if f.startswith("chapters/")]
chapter_params = pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])


def first_cell() -> str:
    return (ROOT / "book" / "first_cell.py").read_text().rstrip("\n")


def test_toc_lists_every_chapter_and_every_file_exists():
    files = toc_files()
    missing = [f for f in files if not any((ROOT / f"{f}{ext}").exists() for ext in (".md", ".ipynb"))]
    assert not missing, f"_toc.yml lists files that do not exist: {missing}"
    notebooks = sorted(f"chapters/{p.stem}" for p in (ROOT / "chapters").glob("*.ipynb"))
    unlisted = [f for f in notebooks if f not in files]
    assert not unlisted, f"notebooks in chapters/ missing from _toc.yml: {unlisted}"
    assert CHAPTERS == sorted(CHAPTERS), "chapters must appear in _toc.yml in file-number order"


def test_install_source_is_the_configured_repository():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    repo = config["repository"]
    expected = f'MOE_LIB_SOURCE = "git+{repo["url"]}@{repo["branch"]}"'
    assert expected in first_cell(), f"book/first_cell.py must use _config.yml's repository: {expected}"


@chapter_params
def test_first_code_cell_is_the_canonical_setup(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code cell"
    assert code[0].source.rstrip("\n") == first_cell(), (
        f"the first code cell of {path.name} must be exactly book/first_cell.py")


@chapter_params
def test_notebook_is_small_and_does_not_embed_plotly_js(path):
    size = path.stat().st_size
    assert size < MAX_NOTEBOOK_BYTES, f"{path.name} is {size / 1e6:.2f} MB; the limit is 1 MB"
    text = path.read_text()
    for marker in ("cdn.plot.ly", "* plotly.js v", "require.config"):
        assert marker not in text, f"{path.name} embeds or fetches plotly.js ({marker!r})"


@chapter_params
def test_outputs_can_be_shown_and_no_widget_state_is_stored(path):
    nb = nbformat.read(path, as_version=4)
    assert "widgets" not in nb.metadata, f"{path.name} stores widget state; clear it before committing"
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.output_type in ("display_data", "execute_result"):
                assert any(m in out.data for m in SHOWN_MIMES), (
                    f"{path.name} cell {i}: no output type the book can show ({sorted(out.data)})")
                if "application/vnd.plotly.v1+json" in out.data:
                    assert PLOTLY_HTML in out.data.get("text/html", ""), (
                        f"{path.name} cell {i}: a plotly figure without its HTML div; "
                        "call moe_lib.viz.setup_notebook() first")


# -- the build ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built_book(tmp_path_factory):
    out = tmp_path_factory.mktemp("book")
    jb = Path(sys.executable).parent / "jupyter-book"
    command = [str(jb), "build", str(ROOT), "--path-output", str(out), "-W", "-n", "--keep-going"]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900)
    return proc, out / "_build" / "html"


def test_book_builds_without_warnings(built_book):
    proc, html = built_book
    log = proc.stdout + proc.stderr
    warnings = [line for line in log.splitlines() if re.search(r"WARNING|ERROR|CRITICAL", line)]
    assert proc.returncode == 0 and not warnings, "\n".join(warnings) or log[-5000:]
    assert "build succeeded" in log
    for f in toc_files():
        assert (html / f"{f}.html").exists(), f"{f}.html was not built"
    for asset in ("plotly.min.js", "mathjax/tex-chtml.js", "mathjax/output/chtml/fonts/woff-v2"):
        assert (html / "_static" / asset).exists(), f"_static/{asset} is missing from the build"


@pytest.fixture(scope="module")
def served_book(built_book):
    proc, html = built_book
    if proc.returncode != 0:
        pytest.fail("the book did not build; see test_book_builds_without_warnings")
    handler = functools.partial(_QuietHandler, directory=str(html))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def chromium():
    binary = find_chromium()
    if binary is None:
        if in_ci():
            pytest.fail("chromium is not installed (CI requires the browser test): run scripts/setup.sh")
        pytest.skip("chromium is not installed (apt-get install chromium, or run scripts/setup.sh)")
    with Chromium(binary) as browser:
        yield browser


# Runs in the page once it has loaded: waits for MathJax's first typeset and for plotly's drawing.
INSPECT = """(async () => {
  const wait = async (done, ms) => {
    const t0 = Date.now();
    while (!done() && Date.now() - t0 < ms) await new Promise(r => setTimeout(r, 100));
  };
  const math = [...document.querySelectorAll('.math')];
  if (math.length) {
    await wait(() => window.MathJax && MathJax.startup && MathJax.startup.promise, 20000);
    if (window.MathJax && MathJax.startup && MathJax.startup.promise) await MathJax.startup.promise;
  }
  const figures = [...document.querySelectorAll('div.plotly-graph-div')];
  await wait(() => figures.every(d => d.querySelector('svg.main-svg')), 30000);
  return {
    plotly: typeof Plotly === 'undefined' ? null : Plotly.version,
    plotlyScripts: [...document.scripts].filter(s => /plotly(\\.min)?\\.js/.test(s.src)).length,
    mathjax: window.MathJax && MathJax.version ? MathJax.version : null,
    figures: figures.length,
    drawn: figures.filter(d => d.querySelector('svg.main-svg')).length,
    math: math.length,
    typeset: math.filter(m => m.querySelector('mjx-container')).length,
    mathErrors: document.querySelectorAll('mjx-merror').length,
  };
})()"""


def _stored_figures(path: Path) -> int:
    """Plotly figures among the notebook's outputs that the book shows (not tagged for removal)."""
    nb = nbformat.read(path, as_version=4)
    shown = [c for c in nb.cells if not {"remove-output", "remove-cell"} & set(c.metadata.get("tags", []))]
    return sum(PLOTLY_HTML in out.get("data", {}).get("text/html", "")
               for cell in shown for out in cell.get("outputs", []))


@pytest.mark.parametrize("page", toc_files())
def test_page_renders_offline_in_chromium(page, served_book, chromium):
    url = served_book + page + ".html"
    tab = chromium.open(url)
    state = chromium.evaluate(tab, INSPECT)
    chromium.settle(1.0)
    (ARTIFACTS / "browser").mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "browser" / f"{page.replace('/', '_')}.json").write_text(json.dumps(
        {"state": state, "requests": tab.requests, "errors": tab.errors, "failures": tab.failures}, indent=1))
    local = ("data:", "blob:", "about:", served_book)
    outside = [u for u in tab.requests if not u.startswith(local)]
    assert not outside, f"{page}: requests left the machine: {outside}"
    assert not tab.failures, f"{page}: failed requests: {tab.failures}"
    assert not tab.errors, f"{page}: JavaScript errors: {tab.errors}"
    assert state["plotlyScripts"] == 1 and state["plotly"], f"{page}: plotly.js must load once: {state}"
    if state["math"]:
        assert (state["mathjax"] or "").startswith("3."), f"{page}: MathJax did not load: {state}"
    assert state["typeset"] == state["math"], f"{page}: math not typeset: {state}"
    assert state["mathErrors"] == 0, f"{page}: {state['mathErrors']} TeX errors"
    undrawn = state["figures"] - state["drawn"]
    assert undrawn == 0, f"{page}: {undrawn} of {state['figures']} figures did not draw"
    if page.startswith("chapters/"):
        stored = _stored_figures(ROOT / f"{page}.ipynb")
        assert state["figures"] == stored, f"{page}: {state['figures']} figures on the page, {stored} stored"
        name = Path(page).stem
        chromium.screenshot(tab, ARTIFACTS / f"{name}.png")
        if state["figures"]:
            chromium.evaluate(tab, "document.querySelector('div.plotly-graph-div')"
                                   ".scrollIntoView({block: 'center'})")
            chromium.screenshot(tab, ARTIFACTS / f"{name}_figure.png")
    chromium.close(tab)
