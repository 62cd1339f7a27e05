"""Moved to :mod:`metatut.course.checks_fewshot` (the course's exercise checkers of notebooks 05-06); this old import path keeps working.

``metatut.checks_fewshot`` *is* ``metatut.course.checks_fewshot`` (the same module object), so every name, the private
helpers and monkeypatching included, behaves exactly as before the move.
"""
import importlib
import sys

sys.modules[__name__] = importlib.import_module(".course.checks_fewshot", __package__)
