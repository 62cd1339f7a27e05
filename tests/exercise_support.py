"""Shared by the checker tests: each exercise's solution (taken from its source with the generator's own
parser, so the tests run exactly the code of exercises/solutions/*.ipynb), a stub, and an assertion helper."""
from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import pytest

import metatut
from metatut.checks import CheckFailed

EXERCISES = Path(__file__).resolve().parent.parent / "exercises"
METATUT = Path(metatut.__file__).resolve().parent  # no line of what Jupyter shows may point in here


@functools.cache
def generator_module():
    spec = importlib.util.spec_from_file_location("exercises_generate", EXERCISES / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while the class is built
    spec.loader.exec_module(module)
    return module


def solution(stem: str, name: str):
    """The function ``name`` defined by the solution code of ``exercises/src/<stem>.py``."""
    namespace: dict = {}
    code = generator_module().solution_code(EXERCISES / "src" / f"{stem}.py")
    exec(compile(code, f"<solution {stem}>", "exec"), namespace)
    return namespace[name]


def stub(*args):
    # YOUR CODE HERE
    raise NotImplementedError()


def fails_with(check, fn, phrase: str) -> str:
    """Assert that ``check(fn)`` fails with a message naming the checker and containing ``phrase``.

    The hint comes first: the message's second line starts with "Hint:" (or the first line is the whole
    story, for the stub), and what Jupyter shows (``_render_traceback_``) starts with the same two lines and
    shows no frame of the checker's own code.
    """
    with pytest.raises(CheckFailed) as info:
        check(fn)
    message = str(info.value)
    lines = message.splitlines()
    assert message.startswith(f"{check.__name__} failed: "), message
    assert len(lines) == 1 or lines[1].startswith("Hint: "), message
    assert phrase.lower() in message.lower(), message
    shown = shown_in_jupyter(info.value)
    assert shown[0] == "✘ " + lines[0] and shown[1:2] == lines[1:2], shown
    return message


def shown_in_jupyter(failure: BaseException) -> list[str]:
    """The lines that IPython (and so Jupyter) shows for ``failure``, checked to name no checker frame."""
    shown = failure._render_traceback_()
    assert isinstance(shown, list) and all(isinstance(line, str) for line in shown), shown
    text = "\n".join(shown)
    assert str(METATUT) not in text and "Traceback (most recent call last)" not in text, text
    return shown
