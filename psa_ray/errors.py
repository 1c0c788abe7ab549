"""Errors the user can fix, and how the jobs end on them.

`UserError` is the base of what a user's input can cause: a manifest or classes that do not
parse (`io.manifest.ManifestError`), weights or checkpoints that cannot be read or do not fit
(`models.weights.WeightsError`), label folders that cannot be scored (`pipeline.scoring.ScoringError`).
`run_job` runs a job's main: a UserError ends as one line, `error: <message>`, and exit status 2;
anything else keeps its traceback (status 1). Both are redacted (`io.redact.redact`).
"""
from __future__ import annotations

import sys
import traceback
from typing import Callable

from psa_ray.io.redact import redact


class UserError(ValueError):
    """A problem with what the user gave; the message names it (and the file or option)."""


def run_job(main: Callable[[], int]) -> int:
    """main()'s exit status; a UserError prints `error: <message>` and gives 2, another
    exception prints its traceback without credentials and gives 1."""
    try:
        return main()
    except UserError as e:
        print(f"error: {redact(str(e))}", file=sys.stderr)
        return 2
    except Exception:
        print(redact(traceback.format_exc()), file=sys.stderr)
        return 1
