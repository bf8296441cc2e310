"""Progress on stderr (rich): a bar with rate and ETA for long jobs, a spinner for start-up
steps; or nothing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol


class Advance(Protocol):
    def __call__(self, n: int = 1, description: str | None = None) -> None: ...


@contextmanager
def progress_bar(
    show: bool, total: int, description: str, *, done: int = 0, unit: str = ""
) -> Iterator[Advance]:
    """Yields advance(n=1, description=None): n more steps done, optionally a new label.

    unit: what a step is (e.g. "neurons"), shown with the rate; no rate column without it."""

    def silent(n: int = 1, description: str | None = None) -> None:
        return None

    if not show:
        yield silent
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        Task,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task: Task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:,.0f} {unit}/s" if speed else "", style="cyan")

    columns: list[ProgressColumn] = [
        TextColumn("[bold]{task.description:<16}"),
        BarColumn(),
        MofNCompleteColumn(),
    ]
    if unit:
        columns.append(Rate())
    columns += [TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=total, completed=done)

        def advance(n: int = 1, description: str | None = None) -> None:
            bar.update(task, advance=n, description=description)

        yield advance


@contextmanager
def status(show: bool, text: str) -> Iterator[None]:
    """A spinner with `text` on stderr while a step of unknown length runs; or nothing."""
    if not show:
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(text):
        yield
