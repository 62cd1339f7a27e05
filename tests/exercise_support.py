"""Shared by the checker tests: each exercise's solution (taken from its source with the generator's own
parser, so the tests run exactly the code of exercises/solutions/*.ipynb), a stub, and an assertion helper."""
from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import pytest

from metatut.checks import CheckFailed

EXERCISES = Path(__file__).resolve().parent.parent / "exercises"


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
    """Assert that ``check(fn)`` fails with a message naming the checker and containing ``phrase``."""
    with pytest.raises(CheckFailed) as info:
        check(fn)
    message = str(info.value)
    assert message.startswith(f"{check.__name__} failed: "), message
    assert phrase.lower() in message.lower(), message
    return message
