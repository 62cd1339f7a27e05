#!/usr/bin/env bash
# metatut's two entry points. Each sets up (or reuses) the virtual environment first.
#   bash run.sh lab    set up, then open JupyterLab on the course (extra arguments go to jupyter lab)
#   bash run.sh test   set up, then run the whole test suite (lint, unit tests, notebooks, exercises)
#   bash run.sh lint   set up, then lint only (ruff: pyflakes and bugbear rules, pyproject.toml)
# Needs only python3 (>= 3.10) and access to the Python package index.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

VENV="${METATUT_VENV:-.venv}"
PYTHON="$VENV/bin/python"

setup() {
    if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
        echo "metatut needs Python >= 3.10 (python3 is $(python3 --version 2>&1))" >&2
        exit 2
    fi
    if [ ! -x "$PYTHON" ]; then
        echo "==> creating the virtual environment in $VENV"
        python3 -m venv "$VENV"
    fi
    # Reinstall only when the dependency list changed (the stamp holds pyproject.toml's hash).
    local stamp="$VENV/.metatut-deps" want
    want="$(python3 -c 'import hashlib,sys; print(hashlib.sha256(open("pyproject.toml","rb").read()).hexdigest())')"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$PYTHON" -c 'import metatut, torchvision' 2>/dev/null || [ ! -x "$VENV/bin/ruff" ]; then
        echo "==> installing metatut and its dependencies into $VENV (first time: a few minutes, ~5 GB)"
        "$PYTHON" -m pip install --quiet --disable-pip-version-check --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
        "$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".[course,test]" 2>&1 | grep -v "^WARNING: Location" || true
        "$PYTHON" -c 'import metatut, torch, torchvision, nbval' || { echo "installation failed" >&2; exit 1; }
        echo "$want" > "$stamp"
    fi
}

case "${1:-}" in
    lab)
        shift
        setup
        extra=()
        if [ "$(id -u)" = "0" ]; then
            extra+=(--allow-root)   # containers often run as root; JupyterLab refuses that otherwise
        fi
        exec "$VENV/bin/jupyter" lab --ServerApp.root_dir="$PWD" \
            --LabApp.default_url=/lab/tree/notebooks/00_setup.ipynb "${extra[@]}" "$@"
        ;;
    lint)
        shift
        setup
        exec "$VENV/bin/ruff" check . "$@"
        ;;
    test)
        shift
        setup
        echo "==> lint (ruff: pyflakes and bugbear rules)"
        "$VENV/bin/ruff" check --quiet . || { echo "lint failed: run 'bash run.sh lint' to see the findings" >&2; exit 1; }
        export METATUT_FAST=1                      # the 'ci' budget profile: small, fast runs
        export METATUT_DATA="${METATUT_DATA:-$PWD/data}"
        # Tiny models gain nothing from intra-op threads, and threads oversubscribe the cores when
        # several test processes run: one thread per process, one process per core.
        export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
        workers="${METATUT_TEST_WORKERS:-$(python3 -c 'import os; print(max(1, min(4, len(os.sched_getaffinity(0)))))')}"
        echo "==> exercise notebooks are generated from their sources and up to date"
        "$PYTHON" exercises/generate.py --check
        echo "==> unit tests, notebooks (nbval) and exercise solutions (nbval)"
        exec "$PYTHON" -m pytest tests notebooks exercises/solutions -n "$workers" --dist loadfile \
            --nbval-lax --nbval-current-env -p no:cacheprovider "$@"
        ;;
    *)
        echo "usage: bash run.sh lab|test|lint [extra arguments]" >&2
        exit 2
        ;;
esac
