#!/usr/bin/env bash
# Set up a fresh Debian machine for building the book and running the tests. Idempotent: every step
# is skipped or a no-op when it is already done.
#   - .venv with the pinned stack of requirements.txt and moe_lib itself (editable)
#   - Debian's chromium and chromium-driver, for the browser test (apt; root or sudo)
#   - plotly.min.js and MathJax (npm's `mathjax` package) in book/_static/, so builds run offline
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet -r requirements.txt
.venv/bin/python -m pip install --quiet -e .
# compile moe_lib's C++ CPU kernels now (about a minute, once per machine) rather than in the first test
.venv/bin/python -c "from moe_lib import native; import sys; sys.exit(native.ops() is None)" \
    || echo "warning: moe_lib's C++ CPU kernels did not build; the experts run the Python tasks"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ "${#missing[@]}" -gt 0 ]; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

.venv/bin/python book/_ext/book_assets.py >/dev/null
echo "setup done: .venv ready, chromium $(chromium --version 2>/dev/null | awk '{print $2}'), book assets in book/_static/"
