"""Critical-path accounting of the task graph an engine executes.

An engine records every module evaluation it runs (forward or backward) as a task, with
the tasks whose outputs it consumed as dependencies. The critical path is the longest
chain of dependent tasks: the number of sequential module evaluations one step needs when
every independent task runs on its own device.
"""

from __future__ import annotations

from typing import Iterable, Optional

__all__ = ["TaskGraph", "Task"]

Task = int


class TaskGraph:
    """A DAG of module evaluations, built in execution order."""

    def __init__(self) -> None:
        self._depth: list[int] = []
        self._labels: list[str] = []

    def add(self, label: str, deps: Iterable[Optional[Task]] = ()) -> Task:
        """Record one module evaluation that waits on ``deps`` and return its task id.

        ``None`` entries in ``deps`` stand for inputs that need no evaluation (the batch).
        """
        depth = 1 + max((self._depth[d] for d in deps if d is not None), default=0)
        self._depth.append(depth)
        self._labels.append(label)
        return len(self._depth) - 1

    def depth(self, task: Task) -> int:
        """Number of evaluations on the longest chain that ends with ``task``."""
        return self._depth[task]

    @property
    def critical_path(self) -> int:
        return max(self._depth, default=0)

    @property
    def num_tasks(self) -> int:
        return len(self._depth)

    def labels(self, prefix: str = "") -> list[str]:
        """Labels of the recorded tasks that start with ``prefix``, in execution order."""
        return [label for label in self._labels if label.startswith(prefix)]

    def count(self, prefix: str) -> int:
        """Number of recorded tasks whose label starts with ``prefix``."""
        return len(self.labels(prefix))
