#!/usr/bin/env bash
# Install the peer libraries that bench/bench_peers.py compares metatut against (learn2learn 0.2.0,
# higher 0.2.1, TorchOpt 0.7.3) into bench/.peers/, which git ignores. They are benchmark-only: they
# are not metatut dependencies, and nothing is installed into the Python environment itself.
#
#   PYTHON=/path/to/python bash bench/setup_peers.sh      # default PYTHON: python3
#
# Use the same Python (with torch and numpy installed) as for the benchmark: learn2learn's Cython
# extensions are compiled for it. Needs network access to the package index and a C compiler.
#
# learn2learn 0.2.0 ships only as a source archive whose pre-generated C files do not compile on
# Python 3.11, so it is downloaded, unpacked and built in place with `setup.py build_ext --inplace`,
# which re-runs Cython on its .pyx files. Everything its import needs (gym, scipy, requests, ...) is
# installed with --no-deps into bench/.peers/site, so that no other package is pulled in.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
# an absolute interpreter path: the build below runs in another directory
PYTHON="$("$PYTHON" -c 'import sys; print(sys.executable)')" || {
    echo "error: cannot run the Python interpreter given in PYTHON" >&2
    exit 1
}
BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PEERS_DIR="$BENCH_DIR/.peers"
SITE_DIR="$PEERS_DIR/site"
L2L_VERSION="0.2.0"
L2L_DIR="$PEERS_DIR/learn2learn-$L2L_VERSION"
DOWNLOAD_DIR="$PEERS_DIR/download"

echo "== Python: $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
"$PYTHON" -c 'import torch, numpy' || {
    echo "error: $PYTHON cannot import torch and numpy; set PYTHON to the benchmark's interpreter" >&2
    exit 1
}
mkdir -p "$SITE_DIR" "$DOWNLOAD_DIR"

echo "== higher, TorchOpt and the packages learn2learn imports -> $SITE_DIR"
"$PYTHON" -m pip install --upgrade --target "$SITE_DIR" --no-deps \
    higher==0.2.1 torchopt==0.7.3 optree cython gym==0.26.2 gym_notices cloudpickle scipy \
    requests urllib3 idna certifi charset_normalizer graphviz

echo "== learn2learn $L2L_VERSION source archive -> $DOWNLOAD_DIR"
"$PYTHON" -m pip download --no-deps --no-binary :all: --dest "$DOWNLOAD_DIR" "learn2learn==$L2L_VERSION"
ARCHIVE="$DOWNLOAD_DIR/learn2learn-$L2L_VERSION.tar.gz"
[ -f "$ARCHIVE" ] || { echo "error: $ARCHIVE was not downloaded" >&2; exit 1; }

echo "== building learn2learn's Cython extensions in $L2L_DIR"
rm -rf "$L2L_DIR"
tar -xzf "$ARCHIVE" -C "$PEERS_DIR"
(cd "$L2L_DIR" && PYTHONPATH="$SITE_DIR" "$PYTHON" setup.py build_ext --inplace > build.log 2>&1) || {
    echo "error: learn2learn build failed; the last lines of $L2L_DIR/build.log:" >&2
    tail -n 30 "$L2L_DIR/build.log" >&2
    exit 1
}

PEERS_PATH="$SITE_DIR:$L2L_DIR"
echo "== checking the imports"
PYTHONPATH="$PEERS_PATH${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -W ignore - <<'PY' 2>&1 | grep -v -i "gym"
import importlib.metadata
import higher, learn2learn, torchopt
print("learn2learn", learn2learn.__version__, "| higher", importlib.metadata.version("higher"),
      "| torchopt", torchopt.__version__)
PY

echo
echo "Done. bench/bench_peers.py finds bench/.peers by itself; for other scripts or a shell:"
echo "export PYTHONPATH=$PEERS_PATH\${PYTHONPATH:+:\$PYTHONPATH}"
