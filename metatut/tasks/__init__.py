"""Task families and the :class:`TaskBatch` container."""
from .base import TaskBatch
from .regression import LinearTasks, SinusoidTasks

__all__ = ["TaskBatch", "SinusoidTasks", "LinearTasks"]
