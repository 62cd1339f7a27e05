"""Moved to :mod:`metatut.course.checks_family` (the course's exercise checkers of notebook 04); this old import path keeps working.

``metatut.checks_family`` *is* ``metatut.course.checks_family`` (the same module object), so every name, the private
helpers and monkeypatching included, behaves exactly as before the move.
"""
import importlib
import sys

sys.modules[__name__] = importlib.import_module(".course.checks_family", __package__)
