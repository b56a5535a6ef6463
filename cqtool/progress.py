"""Rich progress bars for long work: `with progress_bar() as track: for x in track(items, description=...)`."""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def progress_bar(enabled: bool = True):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    if not enabled:
        yield lambda it, description="": it
        return
    cols = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*cols, transient=False) as prog:

        def track(items: Iterable[T], description: str = "") -> Iterator[T]:
            items = list(items)
            task = prog.add_task(description, total=len(items))
            for x in items:
                yield x
                prog.advance(task)

        yield track
