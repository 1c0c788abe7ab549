"""What a job prints (`psa_ray.pipeline.progress`): a progress line at most every few seconds
with images done / to do, images/s and the time left, counted by the stage's writers."""
from __future__ import annotations

import re
import time

from psa_ray.pipeline.progress import StageProgress, progress_line
from psa_ray.pipeline.writers import write_row_files


def test_progress_line_says_done_total_rate_and_time_left():
    assert progress_line("labels", 120, 600, 40.0) == "[labels] 120 / 600 images, 3.0 images/s, about 3 min left"
    assert progress_line("seeds", 30, 60, 10.0) == "[seeds] 30 / 60 images, 3.0 images/s, about 10 s left"
    assert progress_line("labels", 600, 600, 200.0) == "[labels] 600 / 600 images, 3.0 images/s"
    assert progress_line("labels", 0, 600, 5.0) == "[labels] 0 / 600 images, 0.0 images/s"


def test_stage_progress_prints_what_the_writers_counted(ray_cluster, tmp_path, capsys):
    import numpy as np

    batch = {"image_id": np.array(["a", "b", "c"], dtype=object), "png": np.array([b"x", b"", b"y"], dtype=object),
             "error": np.array(["", "decode", ""], dtype=object)}
    lines: list[str] = []
    with StageProgress("labels", 10, every_s=0.2) as progress:
        write_row_files(batch, folder=str(tmp_path), column="png", counter=progress.counter)
        deadline = time.monotonic() + 60  # the counter actor starts in a second or so
        while not lines and time.monotonic() < deadline:
            time.sleep(0.5)
            lines += capsys.readouterr().out.splitlines()
        time.sleep(1.0)  # no new line while the count stays
    lines += capsys.readouterr().out.splitlines()
    assert lines and re.fullmatch(r"\[labels\] 3 / 10 images, [0-9.]+ images/s, about .* left", lines[-1]), lines
    assert len(lines) == 1, "a line only when the count moved"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "c.png"]
