#!/usr/bin/env python3
"""Execute course notebooks in place, one after another (never in parallel), then clean their outputs.

Usage::

    python scripts/execute_notebook.py notebooks/04_maml_family.ipynb            # the laptop budget (committed runs)
    python scripts/execute_notebook.py --budget ci notebooks/06_maml_omniglot.ipynb   # a quick trial at the CI budget
    python scripts/execute_notebook.py --out /tmp/x.ipynb notebooks/06_maml_omniglot.ipynb  # leave the file alone

Each notebook runs in a fresh kernel with its folder as the working directory and ``METATUT_BUDGET`` set, then
``scripts/clean_notebook_outputs.py`` removes the executing machine's traces. Prints the wall time of each run
(the "laptop run time" that the course map quotes is this figure, measured on a quiet machine).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    """A short description of the executing machine: CPU cores (and the GPU, when there is one)."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, {cores} CPU cores"
    return f"{cores}-core CPU, no GPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--budget", choices=("ci", "laptop", "gpu"), default="laptop")
    parser.add_argument("--out", type=Path, help="write the executed notebook here (one notebook only)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell (default 3600)")
    args = parser.parse_args(argv)
    if args.out and len(args.notebooks) != 1:
        parser.error("--out takes exactly one notebook")
    import nbformat
    from nbclient import NotebookClient

    sys.path.insert(0, str(ROOT / "scripts"))
    import clean_notebook_outputs as clean

    os.environ["METATUT_BUDGET"] = args.budget
    os.environ.pop("METATUT_FAST", None)
    for path in args.notebooks:
        path = path.resolve()
        nb = nbformat.read(path, as_version=4)
        start = time.perf_counter()
        NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}, record_timing=True).execute()
        seconds = time.perf_counter() - start
        # The course map (notebook 00, README) quotes this: the budget, the wall time and the machine of the run.
        nb.metadata.setdefault("metatut", {})["execution"] = {
            "budget": args.budget, "seconds": round(seconds, 1), "machine": machine()}
        target = args.out.resolve() if args.out else path
        target.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        clean.main([str(target)])
        print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: executed at the {args.budget} "
              f"budget in {seconds:.0f} s -> {target}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
