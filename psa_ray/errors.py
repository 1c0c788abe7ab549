"""Errors the user can fix, and how the jobs end on them.

`UserError` is the base of what a user's input can cause: a manifest or classes that do not
parse (`io.manifest.ManifestError`), weights or checkpoints that cannot be read or do not fit
(`models.weights.WeightsError`), label folders that cannot be scored (`pipeline.scoring.ScoringError`).
`run_job` runs a job's main: a UserError ends as one line, `error: <message>`, and exit status 2;
anything else keeps its traceback (status 1). Both are redacted (`io.redact.redact`). A
UserError raised in a Ray worker (a training worker that cannot read `--backbone-weights`, an
actor whose checkpoint does not load) reaches the driver wrapped in Ray's errors; `user_error`
finds it there.
"""
from __future__ import annotations

import sys
import traceback
from typing import Callable

from psa_ray.io.redact import redact


class UserError(ValueError):
    """A problem with what the user gave; the message names it (and the file or option)."""


def user_error(error: BaseException) -> UserError | None:
    """The UserError that caused `error`, if any: `error` itself, its cause or context, the
    `cause` of a Ray task error, or a failure of a Ray Train worker (`worker_failures`)."""
    seen: set[int] = set()
    todo: list[BaseException] = [error]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        linked = [e.__cause__, e.__context__, getattr(e, "cause", None),
                  *(getattr(e, "worker_failures", None) or {}).values()]
        todo += [x for x in linked if isinstance(x, BaseException)]
    return None


def run_job(main: Callable[[], int]) -> int:
    """main()'s exit status; a UserError (also one raised in a Ray worker) prints
    `error: <message>` and gives 2, another exception prints its traceback without credentials
    and gives 1."""
    try:
        return main()
    except Exception as e:  # noqa: BLE001 - every error ends as a message and a status
        cause = user_error(e)
        if cause is not None:
            print(f"error: {redact(str(cause))}", file=sys.stderr)
            return 2
        print(redact(traceback.format_exc()), file=sys.stderr)
        return 1
