"""Committed notebooks carry no trace of the machine that executed them (scripts/clean_notebook_outputs.py).

* ``test_committed_notebook_is_clean[...]``: one test per notebook in notebooks/ and exercises/: no known stderr
  noise (profiler ``USDT:`` lines, ``No CUDA runtime is found``) and no absolute path of the executing machine
  (the checkout, ``/tmp``, ``/work``, a home folder, ``$METATUT_DATA``) in any output, saved widget outputs
  included. The failure lists each offending line and says how to fix it.
* The cleaner itself, on a small made-up notebook: what it removes, what it rewrites, what it leaves alone
  (images, other stderr, the JSON layout).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "clean_notebook_outputs.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("clean_notebook_outputs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


clean = _load_script()
NOTEBOOKS = clean.notebook_paths(ROOT)


def test_the_committed_notebooks_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in NOTEBOOKS}
    assert "notebooks/02_inner_loop.ipynb" in names and "exercises/solutions/02_inner_step.ipynb" in names
    assert len([n for n in names if n.startswith("notebooks/")]) >= 8


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_committed_notebook_is_clean(path):
    raw = path.read_text(encoding="utf-8")
    nb = json.loads(raw)
    cleaner = clean.Cleaner(ROOT)
    problems = cleaner.problems(nb)
    assert not problems, (
        f"{path.relative_to(ROOT)} has machine noise in its outputs (run "
        "`python scripts/clean_notebook_outputs.py`, and fix the code that prints it):\n  " + "\n  ".join(problems))
    assert cleaner.clean_notebook(nb) == nb
    assert clean.dumps(nb) == raw, "not in Jupyter's JSON layout (json.dumps(nb, indent=1, ensure_ascii=False))"


# ------------------------------------------------------------------------------------------- the cleaner itself
def _notebook(outputs, widget_outputs=()):
    return {
        "cells": [{"cell_type": "code", "execution_count": 1, "id": "c1", "metadata": {}, "source": ["x\n"],
                   "outputs": outputs}],
        "metadata": {"widgets": {"application/vnd.jupyter.widget-state+json": {
            "state": {"abc": {"model_name": "OutputModel", "state": {"outputs": list(widget_outputs)}}},
            "version_major": 2, "version_minor": 0}}},
        "nbformat": 4, "nbformat_minor": 5,
    }


def _stream(name, text):
    return {"name": name, "output_type": "stream", "text": text}


USDT = "USDT:2026-11-26 08:15:36 7891:7891 SyncActivityProfilerHandler.cpp:39] profiler_start\n"
CUDA = ("W1126 08:17:12.184000 7891 torch/utils/cpp_extension.py:183] [0/0] No CUDA runtime is found, "
        "using CUDA_HOME='/usr/local'\n")


def test_noise_lines_are_removed_and_other_stderr_kept():
    cleaner = clean.Cleaner("/work/main", data_dirs=())
    nb = _notebook([
        _stream("stderr", [USDT]),                                 # only noise: the output goes
        _stream("stderr", [CUDA, "UserWarning: something real\n"]),  # noise and a real warning: the warning stays
        _stream("stdout", "USDT: on stdout is the program's own output\n"),
    ])
    outputs = cleaner.clean_notebook(nb)["cells"][0]["outputs"]
    assert outputs == [_stream("stderr", ["UserWarning: something real\n"]),
                       _stream("stdout", "USDT: on stdout is the program's own output\n")]
    assert len(cleaner.problems(nb)) == 2


def test_absolute_paths_become_relative_or_placeholders():
    cleaner = clean.Cleaner("/work/main", data_dirs=("/scratch/metatut-data",))
    image = {"image/png": "iVBORw0KGgo/tmp/not/a/path", "text/plain": ["<Figure size 720x304 with 2 Axes>"]}
    nb = _notebook([
        _stream("stdout", ["data folder: /work/main/data\n", "checkpoint: /scratch/metatut-data/omniglot/a.pt\n"]),
        _stream("stderr", "/tmp/ipykernel_123/456.py:3: UserWarning: x\n"),
        {"output_type": "display_data", "metadata": {}, "data": image},
        {"output_type": "error", "ename": "FileNotFoundError", "evalue": "/home/ann/.cache/metatut/x.pt",
         "traceback": ["File /work/main/.venv/lib/python3.11/site-packages/torch/serialization.py:1"]},
    ], widget_outputs=[_stream("stdout", "saved to /work/other-checkout/bench/out/run.json\n")])
    cleaned = cleaner.clean_notebook(nb)
    outputs = cleaned["cells"][0]["outputs"]
    assert outputs[0]["text"] == ["data folder: data\n", "checkpoint: <data>/omniglot/a.pt\n"]
    assert outputs[1]["text"] == "<tmp>/ipykernel_123/456.py:3: UserWarning: x\n"
    assert outputs[2]["data"] == image                          # images are never touched
    assert outputs[3]["evalue"] == "~/.cache/metatut/x.pt"
    assert outputs[3]["traceback"] == ["File .venv/lib/python3.11/site-packages/torch/serialization.py:1"]
    widget = cleaned["metadata"]["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]["abc"]
    assert widget["state"]["outputs"][0]["text"] == "saved to bench/out/run.json\n"
    assert cleaner.problems(cleaned) == [] and cleaner.clean_notebook(cleaned) == cleaned
    assert len(cleaner.problems(nb)) == 6


def test_text_that_only_looks_like_a_path_is_left_alone():
    cleaner = clean.Cleaner("/work/main", data_dirs=())
    for text in ("https://github.com/home/work/tmp", "ratio 3/4, a/tmp/b", "<checkout>/data", "~/.cache/metatut",
                 "/usr/local/lib/python3.11", "1/work"):
        assert cleaner.clean_text(text) == text


def test_the_script_rewrites_a_file_in_jupyters_layout(tmp_path):
    path = tmp_path / "n.ipynb"
    nb = _notebook([_stream("stderr", [USDT]), _stream("stdout", "café at /tmp/x\n")])
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    assert clean.main(["--check", str(path)]) == 1
    assert json.loads(path.read_text(encoding="utf-8")) == nb   # --check writes nothing
    assert clean.main([str(path)]) == 0
    text = path.read_text(encoding="utf-8")
    assert "café at <tmp>/x" in text and "USDT" not in text and text.endswith("}\n") and '\n "cells": [' in text
    assert clean.main(["--check", str(path)]) == 0
