"""nbval settings for the course notebooks (pytest loads this file when it collects notebooks/).

Stderr carries warnings with per-run kernel paths, so it is never compared; only cells marked
``# NBVAL_CHECK_OUTPUT`` are compared under ``--nbval-lax``.
"""


def pytest_collectstart(collector):
    if collector.fspath and collector.fspath.ext == ".ipynb":
        collector.skip_compare += ("stderr", "application/vnd.jupyter.widget-view+json", "text/html")
