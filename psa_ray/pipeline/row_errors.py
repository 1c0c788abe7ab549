"""How the actors' rows fail (`actors.per_row`, `per_batch`): which errors are the row's, which
stop the actor, and the error-rate guard that stops a job whose rows mostly fail.

A CUDA error other than out-of-memory ("no kernel image", an illegal memory access, a device-side
assert) leaves the process's CUDA context unusable: every later row would fail too, so it is
raised, not turned into an error row. Out-of-memory is the row's (or the batch's): the memory is
freed and the rows are retried smaller. The guard counts, per stage and process, the rows of the
last `window` that failed; past `limit` of them (once `min_rows` were seen) it stops the job with
one `error:` line (an ErrorRateError is a UserError, `errors.run_job`).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from psa_ray.errors import UserError

FATAL_CUDA_MESSAGES = ("CUDA error", "CUDA driver error", "no kernel image", "illegal memory access",
                       "device-side assert", "CUBLAS_STATUS_", "unspecified launch failure")


class ErrorRateError(UserError):
    """Most of a stage's recent rows failed: the job stops instead of writing only error rows."""


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an out-of-memory error (of the GPU or of a CPU allocator)."""
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(error)


def fatal_device_error(error: BaseException) -> bool:
    """Whether `error` is a CUDA error other than out-of-memory (the actor must fail)."""
    if out_of_memory(error):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(error, accelerator_error):
        return True
    return any(message in str(error) for message in FATAL_CUDA_MESSAGES)


def free_device_memory() -> None:
    """Return the CUDA caching allocator's free blocks (after an out-of-memory error)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class ErrorRate:
    """The failures of a stage's last `window` rows in this process (`record`)."""

    stage: str
    window: int = 1000
    limit: float = 0.5
    min_rows: int = 100
    recent: deque[bool] = field(default_factory=deque)
    failures: int = 0

    def record(self, failed: bool, message: str = "") -> None:
        """Count one row; raise ErrorRateError when more than `limit` of the last `window` rows
        failed (and at least `min_rows` were counted). message: the row's error, if it failed."""
        self.recent.append(failed)
        self.failures += failed
        if len(self.recent) > self.window:
            self.failures -= self.recent.popleft()
        if failed and len(self.recent) >= self.min_rows and self.failures > self.limit * len(self.recent):
            raise ErrorRateError(f"stage {self.stage}: {self.failures} of the last {len(self.recent)} rows failed "
                                 f"(limit {self.limit:.0%}), the last with {message}; stopping the job")


_GUARDS: dict[str, ErrorRate] = {}


def stage_guard(stage: str) -> ErrorRate:
    """This process's ErrorRate of `stage` (the defaults: half of the last 1,000 rows)."""
    return _GUARDS.setdefault(stage, ErrorRate(stage))
