"""Train AffinityNet on stage-B seeds with Ray Train (see --help)."""
import sys

import checkout  # noqa: F401 - first: puts the checkout's psa_ray on sys.path
from psa_ray.errors import run_job
from train_network import main  # jobs/train_network.py

if __name__ == "__main__":
    sys.exit(run_job(lambda: main("affinity")))
