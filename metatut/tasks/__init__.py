"""Task families and the :class:`TaskBatch` container."""
from .base import TaskBatch
from .episodes import EpisodeSampler, sample_episodes
from .regression import LinearTasks, SinusoidTasks

__all__ = ["TaskBatch", "SinusoidTasks", "LinearTasks", "EpisodeSampler", "sample_episodes"]
