"""GPU smoke run: the steps a first GPU run must get through, in one command, one JSON line out.

1. `train`: jobs/train_cam.py trains the CAM network (paper preset) on a small built-in corpus;
   it is killed (SIGKILL) once its first epoch's checkpoint is recorded;
2. `resume`: the same command resumes from that checkpoint and finishes the other epochs (the
   margin of two epochs lets the kill land before a fast GPU has finished);
3. `load_cpu`: the exported weights load and run in a process that sees no GPU
   (CUDA_VISIBLE_DEVICES=, what a CPU-only head does);
4. `label`: the labeling job (stages B-D, paper preset, that CAM network) labels the corpus.

Prints one JSON line: pass/fail of each step, images/s per stage, peak GPU memory (nvidia-smi,
all processes), the precision of training and inference, and the machine; exit status 1 if a
step failed. On one GPU it should take under 8 minutes:

    python bench/gpu_smoke.py                     # 48 images of 320-500 px, resnet38d, the GPU
    python bench/gpu_smoke.py --device cpu        # 12 images of 48-64 px, the tiny backbone (the suite's quick form)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for bench.*

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 3  # killed after the first epoch's checkpoint, resumed for the rest
LOAD_ON_CPU = """import sys, torch
from psa_ray.models.inference import load_trained
assert not torch.cuda.is_available(), "the GPU is visible"
net = load_trained(sys.argv[1])
assert {t.device.type for t in [*net.parameters(), *net.buffers()]} == {"cpu"}
with torch.inference_mode():
    net(torch.zeros(1, 3, 64, 64))
"""


class GpuMemory:
    """Peak GPU memory in use (MiB, all processes: Ray's actors and workers), polled from nvidia-smi."""

    def __init__(self, every_s: float = 0.5):
        self.peak_mib: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(every_s,), daemon=True)
        self._thread.start()

    def _poll(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10, check=True).stdout
            except (OSError, subprocess.SubprocessError):
                return
            used = sum(int(line) for line in out.split())
            self.peak_mib = max(self.peak_mib or 0, used)

    def stop(self) -> int | None:
        self._stop.set()
        self._thread.join()
        return self.peak_mib


def run_step(steps: dict[str, str], name: str, fn: Callable[[], Any]) -> Any:
    """fn() recorded in steps[name] as "pass" or "fail: <reason>"; None if it failed or an
    earlier step did."""
    if any(v != "pass" for v in steps.values()):
        steps[name] = "skipped"
        return None
    try:
        result = fn()
    except Exception as e:  # a failed step is a result
        steps[name] = f"fail: {type(e).__name__}: {str(e)[-500:]}"
        return None
    steps[name] = "pass"
    return result


def train_until_checkpoint(cmd: list[str], env: dict[str, str], snapshot: str, timeout_s: float) -> None:
    """Run the training command and SIGKILL it once Ray Train has recorded a checkpoint (in its
    checkpoint manager's snapshot, what a rerun restores from)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout_s
    try:
        while not (os.path.exists(snapshot) and "checkpoint_" in open(snapshot).read()):
            if proc.poll() is not None:
                raise RuntimeError(f"training ended (status {proc.returncode}) before its first checkpoint")
            if time.time() > deadline:
                raise TimeoutError(f"no checkpoint within {timeout_s:.0f} s")
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def resume(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Rerun the training command; its report, checked to have resumed from a checkpoint."""
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-1500:])
    report: dict[str, Any] = json.loads(done.stdout[done.stdout.index("{\n"):])
    metrics = report["metrics"]
    if not 1 <= metrics.get("resumed_from_epoch", 0) < EPOCHS or metrics.get("epoch") != EPOCHS:
        raise RuntimeError(f"did not resume from a checkpoint: {metrics}")
    return report


def load_on_cpu(weights: str) -> None:
    """Load and run the exported network in a process that sees no GPU."""
    done = subprocess.run([sys.executable, "-c", LOAD_ON_CPU, weights], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-1500:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: the quick form (12 tiny images, the tiny backbone, the demo pipeline's actors)")
    p.add_argument("--images", type=int, help="synthetic images (default: 48, or 12 with --device cpu)")
    p.add_argument("--work-dir", help="folder for the corpus and the runs (default: a temp folder)")
    p.add_argument("--output", help="also write the JSON to this file (e.g. bench/results/gpu_smoke.json)")
    args = p.parse_args(argv)

    import ray
    import torch

    from bench.machine import describe_machine
    from bench.paper_gpu import random_pretrained_weights
    from psa_ray.config import PRESETS
    from psa_ray.data.synthetic import SyntheticConfig, write_corpus
    from psa_ray.models.inference import autocast_dtype
    from psa_ray.pipeline.labeling import LabelJob, run

    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():  # else Ray Train would wait for a GPU forever
        p.error("--device cuda: torch sees no usable GPU here (--device cpu is the quick form)")
    started = time.perf_counter()
    work = args.work_dir or tempfile.mkdtemp(prefix="gpu_smoke_")
    images = args.images or (48 if gpu else 12)
    size = (320, 500) if gpu else (48, 64)
    manifest = write_corpus(os.path.join(work, "corpus"), SyntheticConfig(num_images=images, min_size=size[0],
                                                                           max_size=size[1]))
    backbone = "resnet38d" if gpu else "tiny"
    weights_args = ["--backbone-weights", random_pretrained_weights(backbone, os.path.join(work, "pretrained.pth"))] \
        if gpu else []
    ray.init(include_dashboard=False)  # RAY_ADDRESS: that cluster, else a local one
    if not gpu:  # the paper's whole-core actor requests leave no core for the reads on a small machine
        PRESETS["paper"] = replace(PRESETS["paper"], pipeline=PRESETS["demo"].pipeline)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    train_out = os.path.join(work, "train")
    train_cmd = [sys.executable, os.path.join(REPO, "jobs", "train_cam.py"), "--input", manifest, "--output",
                 train_out, "--preset", "paper", "--backbone", backbone, *weights_args, "--epochs", str(EPOCHS),
                 "--workers", "1", "--cpus-per-worker", "1" if gpu else "0.5", "--val-fraction", "0",
                 *(["--use-gpu"] if gpu else [])]
    memory = GpuMemory() if gpu else None
    steps: dict[str, str] = {}

    run_step(steps, "train", lambda: train_until_checkpoint(
        train_cmd, env, os.path.join(train_out, "checkpoints", "cam", "checkpoint_manager_snapshot.json"), 900))
    report = run_step(steps, "resume", lambda: resume(train_cmd, env)) or {}
    run_step(steps, "load_cpu", lambda: load_on_cpu(report["weights"]))
    with contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON line alone
        summary = run_step(steps, "label", lambda: run(LabelJob(
            output=os.path.join(work, "label"), input=manifest, preset="paper", backbone=backbone,
            cam_checkpoint=report["weights"], epochs=1, use_gpu=gpu,
            **({} if gpu else {"crop_size": 32, "scales": (1.0,)})))) or {}
    if summary and summary["counts"]["labeled"] != images:
        steps["label"] = f"fail: {summary['counts']['labeled']} of {images} images labeled ({summary['counts']})"

    metrics = report.get("metrics", {})
    rates = {"train_cam": round(report["train_images"] / metrics["epoch_seconds"], 3)} if metrics else {}
    for stage in ("seeds", "train_affinity", "labels"):
        seconds = summary.get("timings_s", {}).get(stage)
        if seconds:
            rates[stage] = round(images / seconds, 3)
    inference = None  # the network actors' precision, as they choose it
    if not gpu or torch.cuda.is_available():
        dtype = autocast_dtype(torch.device(args.device), PRESETS["paper"].pipeline.mixed_precision)
        inference = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    result = {"ok": all(v == "pass" for v in steps.values()), "steps": steps, "device": args.device,
              "images": images, "backbone": backbone, "images_per_s": rates,
              "peak_gpu_memory_mib": memory.stop() if memory else None,
              "precision": {"train": metrics.get("precision"), "inference": inference},
              "wall_s": round(time.perf_counter() - started, 1), "machine": describe_machine()}
    line = json.dumps(result, default=str)
    print(line)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            f.write(line + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
