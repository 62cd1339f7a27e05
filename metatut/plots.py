"""Moved to :mod:`metatut.course.plots` (the course's matplotlib helpers); this old import path keeps working.

``metatut.plots`` *is* ``metatut.course.plots`` (the same module object), so every name, the private
helpers and monkeypatching included, behaves exactly as before the move.
"""
import importlib
import sys

sys.modules[__name__] = importlib.import_module(".course.plots", __package__)
