"""The training console: what a user sees while a run trains."""

from __future__ import annotations

import io

from rich.console import Console

from cmdbnet.training.console import TrainUI


def _ui() -> tuple[TrainUI, io.StringIO]:
    ui, buf = TrainUI(enabled=True), io.StringIO()
    ui.console = Console(file=buf, width=120, force_terminal=False)
    return ui, buf


def test_shows_description_progress_losses_and_messages():
    ui, buf = _ui()
    ui.start(total=10, done=2, description="full on cpu | fp32")
    ui.step(1, 5, 10, {"total": 1.2345, "main": 1.0, "aux": 0.5, "boundary": 0.25}, 1e-4, 12.3,
            {"rss_mib": 2048.0})
    ui.log("out of memory: micro-batch -> 2")
    ui.stop()
    text = buf.getvalue()
    assert "train: full on cpu | fp32" in text
    assert "out of memory: micro-batch -> 2" in text
    assert "loss 1.234 (1.000/0.500/0.250 main/aux/bnd)" in text and "lr 1.00e-04" in text
    assert "12.3 img/s" in text and "2.0G rss" in text and "5/10" in text


def test_disabled_console_prints_nothing():
    ui, buf = _ui()
    ui.enabled = False
    ui.start(total=3, done=0, description="x")
    ui.step(1, 1, 3, {"total": 1.0}, 1e-3, 1.0, {})
    ui.log("hidden")
    ui.stop()
    assert buf.getvalue() == ""
