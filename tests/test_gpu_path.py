"""The GPU path, checked on the CPU (issue 29): weights exported on the CPU, every torch.load with a
map_location, resuming with the optimizer state on the model's device, no silent CPU fallback,
CUDA errors that fail the actor, out-of-memory retried smaller, the error-rate guard, the
precision per device, and a report that runs no network on the driver."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from psa_ray.config import PRESETS, CamConfig
from psa_ray.data.synthetic import CLASS_NAMES
from psa_ray.errors import run_job
from psa_ray.models import inference
from psa_ray.models.inference import GpuUnusableError, arch_supported, export_network, inference_device, load_trained
from psa_ray.models.networks import build_network
from psa_ray.pipeline import actors
from psa_ray.pipeline.actors import NetworkActor, per_row
from psa_ray.pipeline.row_errors import ErrorRate, ErrorRateError
from psa_ray.train.loop import STATE_FILE, make_optimizer, restore_checkpoint, train_precision

REPO = Path(__file__).resolve().parent.parent
C = len(CLASS_NAMES)
ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]


# --------------------------------------------------------------------------- weights on the CPU

def test_every_torch_load_in_the_code_names_a_map_location():
    """A CPU-only head must load what GPU workers saved: each torch.load says where tensors go."""
    calls = []
    for source in [*REPO.glob("psa_ray/**/*.py"), *REPO.glob("jobs/**/*.py")]:
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                named = any(k.arg == "map_location" for k in node.keywords)
                calls.append((f"{source.relative_to(REPO)}:{node.lineno}", named))
    assert len(calls) >= 3, "the weights loader and the training loop call torch.load"
    assert [where for where, named in calls if not named] == []


class _GpuTensor:
    """A stand-in for a tensor on a GPU: only `.cpu()` gives its values."""

    def __init__(self, values: torch.Tensor):
        self.values = values

    def detach(self) -> _GpuTensor:
        return self

    def cpu(self) -> torch.Tensor:
        return self.values.clone()


def test_an_exported_network_has_all_its_tensors_on_the_cpu(tmp_path, save_network):
    state = build_network("cam", "tiny", C).state_dict()
    on_gpu: Any = {k: _GpuTensor(v) for k, v in state.items()}
    weights = export_network(on_gpu, {}, str(tmp_path / "gpu"))
    saved = torch.load(weights, weights_only=True)  # no map_location: the devices as saved
    assert saved.keys() == state.keys()
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in saved.values())
    assert all(torch.equal(saved[k], state[k]) for k in state)

    net = load_trained(save_network(str(tmp_path), "cam", build_network("cam", "tiny", C)))
    assert {t.device.type for t in [*net.parameters(), *net.buffers()]} == {"cpu"}


# --------------------------------------------------------------------------- resume

def test_a_resume_puts_the_optimizer_state_on_the_parameters_device(tmp_path, save_network):
    """The momentum buffers follow the model to its device (the meta device stands in for a GPU:
    an optimizer built before the move would keep them on the CPU)."""
    config = replace(PRESETS["demo"].train_config("cam"), backbone="tiny")
    torch.manual_seed(0)
    model = build_network("cam", "tiny", C)
    optimizer = make_optimizer(model, config)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    folder = os.path.dirname(save_network(str(tmp_path), "cam", model))
    torch.save({"optimizer": optimizer.state_dict(), "epoch": 1, "step": 1, "first_loss": 1.0},
               os.path.join(folder, STATE_FILE))

    on_cpu, _ = restore_checkpoint(build_network("cam", "tiny", C), folder, torch.device("cpu"), config)
    saved, loaded = optimizer.state_dict()["state"], on_cpu.state_dict()["state"]
    assert saved and all(torch.equal(loaded[k]["momentum_buffer"], s["momentum_buffer"]) for k, s in saved.items())

    resumed = build_network("cam", "tiny", C)
    restored, state = restore_checkpoint(resumed, folder, torch.device("meta"), config)
    assert state["epoch"] == 1
    params = [p for g in restored.param_groups for p in g["params"]]
    assert {p.device.type for p in resumed.parameters()} == {"meta"}
    assert all(p.device.type == "meta" for p in params)
    assert restored.state and all(s["momentum_buffer"].device == p.device for p, s in restored.state.items())


# --------------------------------------------------------------------------- devices

def _fake_cuda(monkeypatch, available: bool, capability: tuple[int, int] = (8, 0), smi: str = "") -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ARCHS)

    def nvidia_smi(*args: Any, **kwargs: Any) -> SimpleNamespace:
        if not smi:
            raise FileNotFoundError("nvidia-smi")
        return SimpleNamespace(stdout=smi)
    monkeypatch.setattr(inference.subprocess, "run", nvidia_smi)


def test_a_granted_gpu_that_cuda_cannot_use_is_an_error_naming_driver_and_capability(monkeypatch):
    _fake_cuda(monkeypatch, available=False, smi="Tesla V100-SXM2-16GB, 7.0, 535.104.05\n")
    with pytest.raises(GpuUnusableError) as raised:
        inference_device(["0"])
    message = str(raised.value)
    assert "Ray gave this process GPU ['0']" in message and "CUDA does not work" in message
    assert "Tesla V100-SXM2-16GB, 7.0, 535.104.05" in message, "the GPU, its compute capability and driver"
    assert "NVIDIA driver 580 or newer" in message and "sm_75" in message, "what the installed torch needs"
    assert "Not falling back to the CPU" in message


def test_a_gpu_without_kernels_in_the_installed_torch_is_an_error(monkeypatch):
    _fake_cuda(monkeypatch, available=True, capability=(7, 0))
    with pytest.raises(GpuUnusableError, match=r"compute capability 7\.0.*GPU and driver unknown.*sm_75"):
        inference_device(["0"])


def test_the_device_is_the_cpu_only_without_a_granted_gpu(monkeypatch):
    _fake_cuda(monkeypatch, available=False)
    assert inference_device([]) == torch.device("cpu")
    _fake_cuda(monkeypatch, available=True, capability=(8, 6))
    assert inference_device(["0"]) == torch.device("cuda")


def test_arch_supported_reads_kernels_and_ptx():
    assert arch_supported((8, 6), ["sm_80"]) and arch_supported((8, 9), ["sm_86"])
    assert not arch_supported((7, 0), ARCHS) and not arch_supported((8, 0), ["sm_86", "sm_90"])
    assert arch_supported((12, 0), ["sm_90", "compute_90"]) and not arch_supported((12, 0), ["sm_90"])


def test_training_precision_is_bf16_only_where_native(monkeypatch):
    cuda = torch.device("cuda")
    for capability, expected in (((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert train_precision(cuda, True) == expected
    assert train_precision(cuda, False) == "fp32"
    assert train_precision(torch.device("cpu"), True) == "fp32"


# --------------------------------------------------------------------------- actors

def _network_actor(tmp_path, save_network, fail: Callable[[torch.Tensor], None],
                   scales: tuple[float, ...] = (1.0,)) -> tuple[NetworkActor, list]:
    """A CAM NetworkActor whose network calls `fail(x)` first (the test double); returns it and
    its calls: batch size, whether an exception was being handled then, and the input's width."""
    weights = save_network(str(tmp_path), "cam", build_network("cam", "tiny", C))
    actor = NetworkActor(weights, CamConfig(scales=scales, flip=False))
    calls: list[tuple[int, bool, int]] = []
    real = actor.cam_net.cams

    def cams(x: torch.Tensor) -> torch.Tensor:
        calls.append((x.shape[0], sys.exc_info()[0] is not None, x.shape[-1]))
        fail(x)
        return real(x)
    actor.cam_net.cams = cams
    return actor, calls


def _batch(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tags = np.zeros((n, C), np.float32)
    tags[:, 0] = 1
    column = np.empty(n, object)
    column[:] = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(n)]
    return {"image_id": np.array([f"i{k}" for k in range(n)], object), "rgb": column, "tags": tags,
            "stage": np.array([""] * n, object), "error": np.array([""] * n, object),
            "message": np.array([""] * n, object)}


@pytest.mark.parametrize("message", ["CUDA error: an illegal memory access was encountered",
                                     "CUDA error: no kernel image is available for execution on the device"])
def test_a_cuda_error_at_the_network_fails_the_actor(tmp_path, save_network, message):
    def fail(x: torch.Tensor) -> None:
        raise RuntimeError(message)
    actor, calls = _network_actor(tmp_path, save_network, fail)
    with pytest.raises(RuntimeError, match="CUDA error"):
        actor(_batch(3))
    assert calls == [(3, False, 64)], "raised at once, not retried row by row into error rows"


def test_another_error_at_the_network_becomes_error_rows(tmp_path, save_network):
    def fail(x: torch.Tensor) -> None:
        raise ValueError("a bad image")
    actor, _ = _network_actor(tmp_path, save_network, fail)
    out = actor(_batch(3))
    assert list(out["error"]) == ["ValueError"] * 3 and list(out["stage"]) == ["cam"] * 3


def test_out_of_memory_is_retried_image_by_image_after_the_except_block(tmp_path, save_network, monkeypatch):
    freed = []
    monkeypatch.setattr(actors, "free_device_memory", lambda: freed.append(True))

    def fail(x: torch.Tensor) -> None:
        if x.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 22.00 GiB")
    actor, calls = _network_actor(tmp_path, save_network, fail)
    out = actor(_batch(3))
    assert list(out["error"]) == [""] * 3 and all(c.shape[1:] == (48, 64) for c in out["cams"])
    assert calls == [(3, False, 64), (1, False, 64), (1, False, 64), (1, False, 64)], \
        "one image at a time, with no exception (and its traceback's tensors) alive"
    assert freed == [True], "the cache is freed before the retries"


def test_an_image_out_of_memory_alone_is_redone_with_fewer_scales(tmp_path, save_network, monkeypatch):
    freed = []
    monkeypatch.setattr(actors, "free_device_memory", lambda: freed.append(True))

    def fail(x: torch.Tensor) -> None:
        if x.shape[-1] > 64:  # scale 2 of a 64 px wide image
            raise torch.OutOfMemoryError("CUDA out of memory")
    actor, calls = _network_actor(tmp_path, save_network, fail, scales=(1.0, 2.0))
    out = actor(_batch(2))
    assert list(out["error"]) == ["", ""] and all(c.shape[1:] == (48, 64) for c in out["cams"])
    assert [(n, handling) for n, handling, _ in calls] == [(n, False) for n, _, _ in calls]
    assert [(n, width) for n, _, width in calls] == [
        (2, 64), (2, 128),            # the batch: out of memory at scale 2
        (1, 64), (1, 128), (1, 64),   # each image alone: again, then at scale 1 only
        (1, 64), (1, 128), (1, 64)]
    assert len(freed) == 3


def test_an_image_out_of_memory_by_itself_is_an_error_row(tmp_path, save_network, monkeypatch):
    monkeypatch.setattr(actors, "free_device_memory", lambda: None)

    def fail(x: torch.Tensor) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory")
    actor, _ = _network_actor(tmp_path, save_network, fail)
    assert list(actor(_batch(2))["error"]) == ["OutOfMemoryError"] * 2


# --------------------------------------------------------------------------- the error-rate guard

def _failing(i: int) -> dict[str, Any]:
    raise ValueError(f"row {i} is bad")


def test_the_guard_stops_a_stage_whose_rows_mostly_fail():
    guard = ErrorRate("walk", window=10, min_rows=4)
    per_row(_batch(3), "walk", _failing, {}, guard)  # a handful of rows never trips it
    with pytest.raises(ErrorRateError, match=r"stage walk: 4 of the last 4 rows failed .*ValueError: row 0 is bad"):
        per_row(_batch(3), "walk", _failing, {}, guard)


def test_the_guard_counts_only_the_last_window_rows():
    guard = ErrorRate("crf", window=10, min_rows=4)
    for _ in range(5):
        guard.record(False)
    for _ in range(5):
        guard.record(True, "ValueError: x")  # 5 of 10: not more than half
    guard.record(False)
    with pytest.raises(ErrorRateError, match="6 of the last 10"):
        guard.record(True, "ValueError: x")


@pytest.mark.slow
def test_the_guard_stops_a_job_whose_every_row_fails_with_one_error_line(ray_cluster, capfd):
    """The default guard (half of the last 1,000 rows, from 100 rows on) in Ray Data tasks whose
    every row fails (fn `len` of a row index raises TypeError; Ray workers import no test module)."""
    import ray

    def main() -> int:
        rows = [{"image_id": f"i{i}", "stage": "", "error": "", "message": ""} for i in range(300)]
        stage = partial(per_row, stage="walk", fn=len, columns={})
        ray.data.from_items(rows, override_num_blocks=3).map_batches(stage, batch_size=100).materialize()
        return 0

    assert run_job(main) == 2
    errors = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "stage walk: 100 of the last 100 rows failed" in errors[0]


# --------------------------------------------------------------------------- report

@pytest.mark.slow
def test_the_report_runs_no_network_on_the_driver(ray_cluster, tmp_path, save_network, monkeypatch):
    from psa_ray.data.synthetic import SyntheticConfig, write_corpus
    from psa_ray.io.inputs import read_corpus
    from psa_ray.io.storage import join, read_bytes, write_bytes
    from psa_ray.pipeline import report
    from psa_ray.pipeline.readers import corpus_rows

    corpus_root, output = str(tmp_path / "corpus"), str(tmp_path / "out")
    corpus, _ = read_corpus(write_corpus(corpus_root, SyntheticConfig(num_images=2, seed=1)))
    rows = corpus_rows(corpus, join(corpus_root, "gt"))
    for row in rows:
        write_bytes(join(output, "labels", f"{row['image_id']}.png"), read_bytes(row["gt_uri"]))
    cam_w = save_network(output, "cam", build_network("cam", "tiny", C))
    affinity_w = save_network(output, "affinity", build_network("affinity", "tiny", C))

    def no_network_here(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a network loaded on the driver")
    monkeypatch.setattr(report, "load_trained", no_network_here)
    monkeypatch.setattr(inference, "load_trained", no_network_here)
    preset = replace(PRESETS["demo"], cam=CamConfig(scales=(1.0,), flip=False))
    written = report.write_report(output, rows, preset, cam_w, affinity_w, list(CLASS_NAMES), {}, None)
    assert [os.path.basename(w) for w in written] == [f"{r['image_id']}.png" for r in rows] + ["index.md", "index.html"]
    assert "could not be drawn" not in read_bytes(join(output, "report", "index.md")).decode()


# --------------------------------------------------------------------------- redaction

def test_a_failed_row_prints_its_traceback_redacted(capfd, monkeypatch):
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)

    def leaky(i: int) -> dict[str, Any]:
        raise OSError(f"s3 said no to key {secret}")
    out = per_row(_batch(1), "seed", leaky, {}, ErrorRate("seed"))
    err = capfd.readouterr().err
    assert "Traceback" in err and "OSError" in err and secret not in err
    assert secret not in out["message"][0]


# --------------------------------------------------------------------------- bench/gpu_smoke.py

@pytest.mark.slow
def test_gpu_smoke_quick_form_passes_every_step_on_the_cpu(ray_cluster, tmp_path):
    """`bench/gpu_smoke.py --device cpu`: train, kill, resume, load without a GPU, label (~90 s)."""
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_smoke.py"), "--device", "cpu",
                           "--work-dir", str(tmp_path)], env={**os.environ, "RAY_ADDRESS": ray_cluster},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    # Ray Data may log to stdout when an earlier test of the session configured its logging
    [line] = [text for text in done.stdout.splitlines() if text.startswith("{")]
    result = json.loads(line)
    assert result["steps"] == {"train": "pass", "resume": "pass", "load_cpu": "pass", "label": "pass"}
    assert set(result["images_per_s"]) == {"train_cam", "seeds", "train_affinity", "labels"}
    assert result["precision"]["train"] == "fp32" and result["peak_gpu_memory_mib"] is None
