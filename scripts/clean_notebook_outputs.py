#!/usr/bin/env python3
"""Remove the executing machine's traces from the committed notebooks' outputs (outputs only; no re-execution).

Usage::

    python scripts/clean_notebook_outputs.py            # clean notebooks/ and exercises/ in place
    python scripts/clean_notebook_outputs.py --check    # list what would change; exit 1 if anything would
    python scripts/clean_notebook_outputs.py a.ipynb    # only these files

What it changes, in every output of every code cell (and in the outputs that saved ``Output`` widgets keep in
the notebook's widget state):

* **Noise on stderr** (:data:`NOISE`): the PyTorch profiler's Kineto lines (``USDT:... profiler_start``,
  ``STAGE:...``, ``ERROR:... gpuGetDeviceCount failed``) and ``No CUDA runtime is found, using CUDA_HOME=...``.
  A stderr output left empty is removed.
* **Absolute paths of the executing machine** in text (streams, ``text/*`` data, error tracebacks): a path under
  the checkout becomes relative to it (``/work/main/data`` -> ``data``); a path under ``$METATUT_DATA`` or the
  per-user cache (``~/.cache/metatut``) becomes ``<data>/...``; a path inside another checkout becomes relative
  to it where a top-level folder of the repository names it (``/x/y/notebooks/a.png`` -> ``notebooks/a.png``);
  anything else under a temporary folder becomes ``<tmp>/...``, under a home folder ``~/...``, and elsewhere
  (``/work``, ``/mnt``, ...) ``<path>/<name>``.

Images and the notebook's JSON layout are left as they are: the file is written back as Jupyter writes it,
``json.dumps(nb, indent=1, ensure_ascii=False) + "\\n"``. tests/test_notebook_outputs.py fails when a committed
notebook still has anything this script would change. Needs only the standard library (and ``nbformat``, when
installed, to validate what it writes).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The committed notebooks: the course and the exercises (student and solution copies).
DEFAULT_GLOBS = ("notebooks/*.ipynb", "exercises/*.ipynb", "exercises/solutions/*.ipynb")

#: stderr lines that carry no information for a reader (matched with ``re.search`` on each line).
NOISE = (
    # the PyTorch profiler's C++ library (Kineto): "USDT:2026-11-26 08:15:36 7891:7891 SyncActivityProfilerHandler..."
    re.compile(r"^(?:USDT|STAGE|ERROR|WARNING|INFO):\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+:\d+ [\w./-]+\.(?:cpp|h):\d+\]"),
    # torch.utils.cpp_extension on a machine without a CUDA runtime
    re.compile(r"No CUDA runtime is found, using CUDA_HOME="),
)

# Top-level folders of this repository: a path through one of them is a path inside some checkout.
_REPO_FOLDERS = ("data", "notebooks", "exercises", "checkpoints", "bench", "configs", "scripts", "tests", ".venv")
_TEMP_PREFIXES = ("/tmp", "/var/tmp", "/var/folders", "/private/var/folders", "/private/tmp")
_HOME_PREFIX = re.compile(r"^(?:/home/[^/]+|/root|/Users/[^/]+)(?=/|$)")
#: An absolute path of the kind only the executing machine has (POSIX; ends at whitespace, quotes or brackets).
ABSOLUTE_PATH = re.compile(
    r"(?<![\w.~<>/-])(?:/(?:tmp|var/tmp|var/folders|private|work|home|root|Users|mnt|scratch)(?=/|\b)"
    r"[^\s'\"`<>(){}\[\],;:|]*|[A-Za-z]:\\Users\\[^\s'\"`<>]*)")


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else value


def _like(original, text: str):
    """``text`` in the form ``original`` had (Jupyter stores text either as one string or as a list of lines)."""
    return text.splitlines(keepends=True) if isinstance(original, list) else text


class Cleaner:
    """The rules above, for one repository root and one set of data folders."""

    def __init__(self, root: Path = ROOT, data_dirs: tuple[str, ...] | None = None):
        self.root = str(Path(root).resolve())
        if data_dirs is None:
            data_dirs = tuple(d for d in (os.environ.get("METATUT_DATA", "").strip(),) if d)
            data_dirs += (str(Path.home() / ".cache" / "metatut"),)
        self.data_dirs = tuple(str(Path(d).expanduser()) for d in data_dirs if d)
        self.temp_dirs = tuple(dict.fromkeys((*_TEMP_PREFIXES, tempfile.gettempdir())))

    # ------------------------------------------------------------------------------------------- paths
    def relative_path(self, path: str) -> str:
        """What ``path`` (absolute, of the executing machine) becomes in a committed output."""
        def under(prefix: str) -> str | None:
            prefix = prefix.rstrip("/")
            if path == prefix:
                return ""
            if path.startswith(prefix + "/"):
                return path[len(prefix) + 1:]
            return None

        rest = under(self.root)
        if rest is not None:
            return rest or "."
        for data in self.data_dirs:
            rest = under(data)
            if rest is not None:
                return f"<data>/{rest}" if rest else "<data>"
        parts = path.split("/")
        for i, part in enumerate(parts[1:-1] if len(parts) > 2 else [], start=1):
            if part in _REPO_FOLDERS:
                return "/".join(parts[i:])
        if "site-packages" in parts:
            return "<site-packages>/" + "/".join(parts[parts.index("site-packages") + 1:])
        for temp in self.temp_dirs:
            rest = under(temp)
            if rest is not None:
                return f"<tmp>/{rest}" if rest else "<tmp>"
        windows = re.match(r"[A-Za-z]:\\Users\\[^\\]+\\?", path)
        if windows:
            return "~\\" + path[windows.end():]
        home = _HOME_PREFIX.match(path)
        if home:
            rest = path[home.end():].lstrip("/")
            return f"~/{rest}" if rest else "~"
        return "<path>/" + (parts[-1] or parts[-2])

    def clean_text(self, text: str) -> str:
        """``text`` with every absolute path of the executing machine replaced (see :meth:`relative_path`)."""
        # The checkout and the data folders first, wherever they are (METATUT_DATA may be any folder) ...
        for prefix, name in ((self.root, None), *((d, "<data>") for d in self.data_dirs)):
            text = re.sub(r"(?<![\w.~<>/-])" + re.escape(prefix.rstrip("/")) + r"(?=[/\s'\"`),:;\]]|$)(/?)",
                          lambda m, name=name: (f"{name}/" if name else "") if m.group(1) else (name or "."), text)
        # ... then any other path under the usual machine-specific folders.
        def replace(match: re.Match) -> str:
            path = match.group(0).rstrip(".")
            return self.relative_path(path) + match.group(0)[len(path):]
        return ABSOLUTE_PATH.sub(replace, text)

    # ----------------------------------------------------------------------------------------- outputs
    def clean_outputs(self, outputs: list) -> list:
        """The outputs with noise lines removed from stderr (empty stderr outputs dropped) and paths replaced."""
        cleaned = []
        for output in outputs:
            output = dict(output)
            kind = output.get("output_type")
            if kind == "stream":
                text = _text(output.get("text", ""))
                if output.get("name") == "stderr":
                    lines = text.splitlines(keepends=True)
                    kept = [line for line in lines if not any(p.search(line) for p in NOISE)]
                    if lines and not kept:
                        continue
                    text = "".join(kept)
                output["text"] = _like(output.get("text", ""), self.clean_text(text))
            elif kind in ("display_data", "execute_result", "update_display_data"):
                data = dict(output.get("data", {}))
                for mime, value in data.items():
                    if mime.startswith("text/") and isinstance(value, (str, list)):
                        data[mime] = _like(value, self.clean_text(_text(value)))
                output["data"] = data
            elif kind == "error":
                output["evalue"] = self.clean_text(output.get("evalue", ""))
                output["traceback"] = [self.clean_text(line) for line in output.get("traceback", [])]
            cleaned.append(output)
        return cleaned

    def clean_notebook(self, nb: dict) -> dict:
        """A copy of ``nb`` (the notebook's JSON) with every code cell's outputs and saved widget outputs cleaned."""
        nb = json.loads(json.dumps(nb))
        for cell in nb.get("cells", []):
            if cell.get("cell_type") == "code":
                cell["outputs"] = self.clean_outputs(cell.get("outputs", []))
        state = nb.get("metadata", {}).get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
        for model in state.get("state", {}).values():
            inner = model.get("state", {}) if isinstance(model, dict) else {}
            if isinstance(inner.get("outputs"), list):
                inner["outputs"] = self.clean_outputs(inner["outputs"])
        return nb

    # --------------------------------------------------------------------------------------- reporting
    def problems(self, nb: dict) -> list[str]:
        """What :meth:`clean_notebook` would change, one line each (cell number, output, the offending text)."""
        found = []

        def look(where: str, outputs: list) -> None:
            for k, output in enumerate(outputs):
                texts = []
                if output.get("output_type") == "stream":
                    texts.append((output.get("name"), _text(output.get("text", ""))))
                for mime, value in output.get("data", {}).items():
                    if mime.startswith("text/") and isinstance(value, (str, list)):
                        texts.append((mime, _text(value)))
                if output.get("output_type") == "error":
                    texts.append(("error", "\n".join([output.get("evalue", ""), *output.get("traceback", [])])))
                for name, text in texts:
                    for line in text.splitlines():
                        if name == "stderr" and any(p.search(line) for p in NOISE):
                            found.append(f"{where}, output {k} (stderr): noise: {line.strip()[:120]}")
                        elif self.clean_text(line) != line:
                            found.append(f"{where}, output {k} ({name}): absolute path: {line.strip()[:120]}")

        for i, cell in enumerate(nb.get("cells", [])):
            if cell.get("cell_type") == "code":
                look(f"cell {i}", cell.get("outputs", []))
        state = nb.get("metadata", {}).get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
        for model_id, model in state.get("state", {}).items():
            inner = model.get("state", {}) if isinstance(model, dict) else {}
            if isinstance(inner.get("outputs"), list):
                look(f"widget {model_id}", inner["outputs"])
        return found


def dumps(nb: dict) -> str:
    """The notebook as Jupyter writes it."""
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def notebook_paths(root: Path = ROOT) -> list[Path]:
    """The committed notebooks this script looks after."""
    return sorted(p for pattern in DEFAULT_GLOBS for p in Path(root).glob(pattern))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks (default: notebooks/ and exercises/)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if anything would change")
    args = parser.parse_args(argv)
    cleaner = Cleaner()
    changed = 0
    for path in args.paths or notebook_paths():
        raw = path.read_text(encoding="utf-8")
        nb = json.loads(raw)
        cleaned = cleaner.clean_notebook(nb)
        if cleaned == nb:
            continue
        changed += 1
        shown = path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path
        if args.check:
            print(f"{shown}:", *cleaner.problems(nb), sep="\n  ")
            continue
        try:
            import nbformat
            nbformat.validate(nbformat.reads(dumps(cleaned), as_version=nbformat.NO_CONVERT))
        except ImportError:
            pass
        path.write_text(dumps(cleaned), encoding="utf-8")
        print(f"cleaned {shown}")
    if args.check and changed:
        print(f"{changed} notebook(s) carry machine noise: run python scripts/clean_notebook_outputs.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
