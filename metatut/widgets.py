"""Moved to :mod:`metatut.course.widgets` (the course's ipywidgets explorers); this old import path keeps working.

``metatut.widgets`` *is* ``metatut.course.widgets`` (the same module object), so every name, the private
helpers and monkeypatching included, behaves exactly as before the move.
"""
import importlib
import sys

sys.modules[__name__] = importlib.import_module(".course.widgets", __package__)
