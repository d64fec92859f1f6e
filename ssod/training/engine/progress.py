"""A rich progress bar that degrades to nothing when output is not a terminal (CI logs)."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator


class _Bar:
    def __init__(self, progress, task):
        self.progress, self.task = progress, task

    def advance(self, text: str = "") -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, info=text)


@contextmanager
def progress_bar(total: int, description: str) -> Iterator[_Bar]:
    if not sys.stderr.isatty():
        yield _Bar(None, None)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=False,
    ) as p:
        yield _Bar(p, p.add_task(description, total=total, info=""))
