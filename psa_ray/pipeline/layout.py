"""Every path under a job's output (a local folder or an s3:// prefix), in one place.

    corpus/        the built-in corpus (images/, gt/, manifest.parquet, builtin.json)
    rows/          the corpus's checked rows (stage 0), and _corpus.json
    checkpoints/   <kind>/model.pt and meta.json of each trained network, Ray Train's checkpoints
    seeds/         stage B's seed PNGs; index/seeds/ commits them, index/seed-errors/ its failures
    labels/        the pseudo labels, <image_id>.png
    shards/        the labeled rows committed (Parquet); eval/ their scores, errors/ the rows that failed
    report/        index.html, index.md, review.csv and pictures
    run.json, metrics.json, predict.json, lease.json
"""
from __future__ import annotations

from dataclasses import dataclass

from psa_ray.io.storage import join
from psa_ray.models.inference import MODEL_FILE


@dataclass(frozen=True)
class OutputLayout:
    """The paths of one output; `root` as the job was given it (made absolute by the job)."""

    root: str

    def __truediv__(self, name: str) -> str:
        return join(self.root, name)

    @property
    def corpus(self) -> str:
        return self / "corpus"

    @property
    def rows(self) -> str:
        return self / "rows"

    @property
    def checkpoints(self) -> str:
        return self / "checkpoints"

    def checkpoint(self, kind: str) -> str:
        """The folder of network `kind`'s exported weights (model.pt, meta.json)."""
        return join(self.checkpoints, kind)

    def weights(self, kind: str) -> str:
        return join(self.checkpoint(kind), MODEL_FILE)

    @property
    def seeds(self) -> str:
        return self / "seeds"

    @property
    def seed_index(self) -> str:
        return self / "index/seeds"

    @property
    def seed_errors(self) -> str:
        """The rows stage B failed on (ERROR_SCHEMA): not in errors/, which holds the rows that
        could not be labeled (stage D may still label a row whose seeds failed)."""
        return self / "index/seed-errors"

    @property
    def labels(self) -> str:
        return self / "labels"

    @property
    def shards(self) -> str:
        return self / "shards"

    @property
    def eval(self) -> str:
        return self / "eval"

    @property
    def errors(self) -> str:
        return self / "errors"

    @property
    def report(self) -> str:
        return self / "report"

    @property
    def run_record(self) -> str:
        return self / "run.json"

    @property
    def metrics(self) -> str:
        return self / "metrics.json"

    @property
    def predictions(self) -> str:
        return self / "predict.json"

    def masks(self, folder: str) -> str:
        """The folder of a network's training masks (`NetworkSpec.mask_folder`: seeds or labels)."""
        return {"seeds": self.seeds, "labels": self.labels}[folder]
