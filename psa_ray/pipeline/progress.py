"""What a job prints while it runs, in a terminal or a log (`ray job logs`, CI, a redirect).

A line when a stage starts and one when it ends (`stage`); during the stages that go over images,
a progress line at most every PROGRESS_S seconds: images done / to do, images/s, time left
(`StageProgress`, fed by the row writers through a `RowCounter` actor). Ray's own INFO logs and
Ray Data's per-operator progress appear only with --verbose (`quiet_ray`), or, on a terminal, as
Ray Data's progress bars.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from contextlib import contextmanager
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import ray

if TYPE_CHECKING:
    from ray.actor import ActorClass

PROGRESS_S = 10.0


def ray_logging(verbose: bool) -> ray.LoggingConfig:
    """`ray.init`'s logging for the driver and every worker: Ray's INFO lines only when verbose."""
    return ray.LoggingConfig(encoding="TEXT", log_level="INFO" if verbose else "WARNING")


def worker_env(verbose: bool) -> dict[str, str]:
    """Environment of the job's workers: Ray Data's INFO lines (which Ray forwards to the driver's
    output) only when verbose; a training worker's printed line once, not also through Ray
    Train's logger (Ray Train 2.60 tees `print` into it)."""
    return {} if verbose else {"RAY_DATA_LOG_LEVEL": "WARNING", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def quiet_ray(verbose: bool) -> None:
    """In the driver: Ray Data's progress (bars on a terminal, a block of log lines every few
    seconds elsewhere) only when verbose or on a terminal, set before the job's datasets are made
    (they take it with them to Ray Train's workers); and its INFO lines only in its log file
    (`ray-data.log` of the session), not on the console."""
    ray.data.DataContext.get_current().enable_progress_bars = verbose or sys.stdout.isatty()
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):  # the console; the session's log file stays
            handler.setLevel(logging.INFO if verbose else logging.WARNING)


@ray.remote(num_cpus=0)
class RowCounter:
    """Rows a stage has finished, counted by its writers (`writers.write_row_files`)."""

    def __init__(self) -> None:
        self.rows = 0

    def add(self, rows: int) -> None:
        self.rows += rows

    def done(self) -> int:
        return self.rows


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def progress_line(stage: str, done: int, total: int, seconds: float) -> str:
    """`[labels] 120 / 600 images, 3.1 images/s, about 2 min left`."""
    rate = done / seconds if seconds > 0 else 0.0
    left = f", about {_duration((total - done) / rate)} left" if 0 < rate and done < total else ""
    return f"[{stage}] {done:,} / {total:,} images, {rate:.1f} images/s{left}"


class StageProgress:
    """Prints `progress_line` every `every_s` seconds while a stage goes over `total` images;
    `counter` (a RowCounter) is what the stage's writers count on."""

    def __init__(self, stage: str, total: int, every_s: float = PROGRESS_S):
        self.stage, self.total, self.every_s = stage, total, every_s
        self.counter: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"psa-ray-progress-{stage}", daemon=True)

    def _run(self) -> None:
        started, last = time.perf_counter(), -1
        while not self._stop.wait(self.every_s):
            try:
                done = ray.get(self.counter.done.remote(), timeout=self.every_s)
            except Exception:  # progress is best effort; the stage reports its own errors
                continue
            if done != last:
                print(progress_line(self.stage, done, self.total, time.perf_counter() - started), flush=True)
                last = done

    def __enter__(self) -> StageProgress:
        # ray.remote made RowCounter an ActorClass; mypy does not apply class decorators
        self.counter = cast("ActorClass[RowCounter]", RowCounter).remote()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        ray.kill(self.counter)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """`[name] started` / `[name] done in 12 s` around a stage."""
    print(f"[{name}] started", flush=True)
    started = time.perf_counter()
    yield
    print(f"[{name}] done in {_duration(time.perf_counter() - started)}", flush=True)
