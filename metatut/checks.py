"""Moved to :mod:`metatut.course.checks` (the course's exercise checkers); this old import path keeps working.

``metatut.checks`` *is* ``metatut.course.checks`` (the same module object), so every name, the private
helpers and monkeypatching included, behaves exactly as before the move.
"""
import importlib
import sys

sys.modules[__name__] = importlib.import_module(".course.checks", __package__)
