#!/usr/bin/env bash
# Re-execute chapters top to bottom in place, the way they are committed: no widget state, no
# per-cell timing metadata. Usage: bash scripts/execute_notebooks.sh [chapters/<file>.ipynb ...]
set -euo pipefail
cd "$(dirname "$0")/.."
notebooks=("$@")
[ ${#notebooks[@]} -gt 0 ] || notebooks=(chapters/*.ipynb)
for nb in "${notebooks[@]}"; do
  .venv/bin/jupyter nbconvert --to notebook --execute --inplace \
    --ExecutePreprocessor.store_widget_state=False --ExecutePreprocessor.record_timing=False "$nb"
done
