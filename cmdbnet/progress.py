"""The one way long work shows a rich progress bar: on stderr, so stdout stays clean for ``--json``."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn


def progress_bar(label: str, *extra: ProgressColumn | str, enabled: bool = True, transient: bool = False,
                 bar_width: int | None = 40, console: Console | None = None) -> Progress:
    """``label | bar | done/total | *extra | time left``; a disabled bar prints nothing.

    ``extra`` strings become TextColumns (they may use ``{task.fields[...]}``).
    """
    columns = [TextColumn(label), BarColumn(bar_width=bar_width), MofNCompleteColumn(),
               *(TextColumn(c) if isinstance(c, str) else c for c in extra), TimeRemainingColumn()]
    return Progress(*columns, console=console or Console(stderr=True), disable=not enabled, transient=transient)
