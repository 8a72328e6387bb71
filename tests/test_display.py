"""What the terminal shows: the per-frame PSNR sparkline, on values whose picture is known."""

from __future__ import annotations

import io

from rich.console import Console

from ivvae_cli.cli import _print_psnr_picture, lowest_per_column, sparkline
from ivvae_cli.metrics import group_position


def test_sparkline_spans_lowest_to_highest_in_eight_steps():
    assert sparkline([20, 25, 30, 35, 40]) == "▁▃▅▇█"
    assert sparkline([40, 20.01, 22.6]) == "█▁▂"
    assert sparkline([5.0, 5.0]) == "▄▄"  # no spread: the middle
    assert sparkline([]) == ""


def test_columns_show_every_frame_when_they_fit_else_the_lowest_of_each_bin():
    assert lowest_per_column([3.0, 1.0, 2.0], 80) == [0, 1, 2]
    values = [3, 1, 2, 5, 6, 4, 9, 7, 8, 0]  # width 4: bins of 3 frames, the last one short
    assert lowest_per_column(values, 4) == [1, 5, 7, 9]
    assert len(lowest_per_column([1.0] * 1000, 77)) <= 77


def _picture(values: list[float], width: int) -> list[str]:
    out = io.StringIO()
    rows = [{"psnr_db": v, "position": group_position(i)} for i, v in enumerate(values)]
    _print_psnr_picture(Console(file=out, width=width), rows)
    return out.getvalue().splitlines()


def test_keyframes_are_marked_under_their_columns():
    # Frame 0 is the lone first frame; frames 1 and 5 are position 0 of their groups.
    values = [40.0, 20.0, 35.0, 35.0, 35.0, 25.0, 35.0, 35.0, 35.0]
    header, bars, marks = _picture(values, 80)
    assert header == "PSNR per frame (▁ 20.00 to █ 40.00 dB; ^ keyframe):"
    assert bars == "█▁▇▇▇▃▇▇▇"
    assert marks == "^^   ^"


def test_a_long_video_is_binned_to_the_width_and_keeps_its_dips():
    values = [30.0] * 400
    values[203] = 10.0  # position 2 of its group: the dip shows, and is not a keyframe
    header, bars, marks = _picture(values, 100)
    assert header == "PSNR per frame (▁ 10.00 to █ 30.00 dB; a column: the lowest of 4 frames; ^ keyframe):"
    assert bars == "█" * 50 + "▁" + "█" * 49
    # Bins start at frames 0, 4, 8, ...: ties take the first frame, position 3 (frame 4k) but for
    # frame 0; the dip's bin shows frame 203.
    assert marks == "^"
