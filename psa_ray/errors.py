"""Errors the user can fix, and how the jobs end on them.

`UserError` is the base of what a user's input can cause: a manifest or classes that do not
parse (`io.rows.ManifestError`), weights or checkpoints that cannot be read or do not fit
(`models.weights.WeightsError`), label folders that cannot be scored (`pipeline.scoring.ScoringError`).
`run_job` runs a job's main: a UserError ends as one line, `error: <message>`, and exit status 2;
anything else keeps its traceback (status 1). Both are redacted (`io.redact.redact`). A
UserError raised in a Ray worker (a training worker that cannot read `--backbone-weights`, an
actor whose checkpoint does not load) reaches the driver wrapped in Ray's errors; `user_error`
finds it there, also where only its text came back (a Ray Data function's error, which Ray Data
wraps in a UserCodeException without its cause).
"""
from __future__ import annotations

import re
import sys
import traceback
from collections.abc import Callable

from psa_ray.io.redact import redact


class UserError(ValueError):
    """A problem with what the user gave; the message names it (and the file or option)."""


_ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*): (.+)$", re.MULTILINE)


def _user_error_in_text(text: str) -> UserError | None:
    """The last `<module>.<UserError subclass>: message` line of a remote traceback's text."""
    names, todo = set(), [UserError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo += cls.__subclasses__()
    found = [m.group(2) for m in _ERROR_LINE.finditer(text) if m.group(1) in names]
    return UserError(found[-1]) if found else None


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
        if type(e).__module__.startswith("ray.") and (found := _user_error_in_text(str(e))):
            return found
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
    except Exception as e:  # every error ends as a message and a status
        cause = user_error(e)
        if cause is not None:
            print(f"error: {redact(str(cause))}", file=sys.stderr)
            return 2
        print(redact(traceback.format_exc()), file=sys.stderr)
        return 1
