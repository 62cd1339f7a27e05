"""The training command's parts, as a library: configuration, the run folder, the build, the run object.

================  ==========================================================================================
``run.config``    :class:`TrainConfig` (its checks), :func:`load_config`, :class:`ConfigError`, the errors
``run.folder``    ``out_dir``: its checks, its lock, :class:`MetricsLog`, the checks of a resumed checkpoint
``run.build``     device (:func:`~metatut.run.build.select_device`), model, objective, sampler, evaluation
``run.session``   :class:`Run`: set-up, the loop's hooks (checkpoint, log, evaluation), clean-up
================  ==========================================================================================

:func:`metatut.cli.train` drives a :class:`Run`; ``metatut-train`` (:func:`metatut.cli.main`) is its command line.
"""
from .config import ConfigError, EvaluationError, TrainConfig, TrainingDiverged, load_config
from .session import Run

__all__ = ["TrainConfig", "ConfigError", "TrainingDiverged", "EvaluationError", "load_config", "Run"]
