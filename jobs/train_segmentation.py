"""Train DeepLab on pseudo labels with Ray Train (see --help)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from psa_ray.errors import run_job  # noqa: E402
from train_network import main  # noqa: E402 (jobs/train_network.py)

if __name__ == "__main__":
    sys.exit(run_job(lambda: main("deeplab")))
