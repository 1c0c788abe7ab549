"""The output lease (`psa_ray.io.lease`): refusal, renewal, take-over of an expired or dead
lease, loss; on a fake clock, a local folder and S3 (moto); predict.py refused and evaluate.py
warned while another job writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from psa_ray.errors import UserError
from psa_ray.io.lease import (
    LEASE_FILE, Lease, LeaseHeldError, LeaseLostError, Renewer, current_holder, hold)
from psa_ray.io.lease_stores import LocalStore, MemoryStore, S3Store
from psa_ray.io.palette import encode_label_png

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def _lease(store, clock, run_id="run1", machine="m1", pid=100, alive=lambda record: True, ttl=60.0):
    return Lease("/out", run_id, store, ttl_s=ttl, job="label_dataset", clock=clock, sleep=lambda s: None,
                 alive=alive, machine=machine, pid=pid)


def test_a_second_job_is_refused_naming_the_holder_and_the_expiry():
    store, clock = MemoryStore(), Clock()
    first = _lease(store, clock)
    first.acquire()
    clock.now += 10
    with pytest.raises(LeaseHeldError) as refused:
        _lease(store, clock, run_id="run2", machine="m2").acquire()
    message = str(refused.value)
    assert isinstance(refused.value, UserError)
    assert "run run1" in message and "pid 100 on m1" in message and "1970-01-12T13:47:40Z" in message
    assert "50 s from now" in message
    assert json.loads(store.data)["holder"] == first.holder, "the refused job wrote nothing"


def test_renewal_keeps_the_lease_past_its_first_expiry():
    store, clock = MemoryStore(), Clock()
    first = _lease(store, clock)
    first.acquire()
    for _ in range(5):
        clock.now += 20
        assert first.renew()
    assert first.expires_at == clock.now + 60
    with pytest.raises(LeaseHeldError):
        _lease(store, clock, run_id="run2", machine="m2").acquire()


def test_an_expired_lease_is_taken_over_and_its_old_holder_learns_it():
    store, clock = MemoryStore(), Clock()
    first = _lease(store, clock)
    first.acquire()
    clock.now += 59
    with pytest.raises(LeaseHeldError):
        _lease(store, clock, run_id="run2", machine="m2").acquire()
    clock.now += 1  # expired
    second = _lease(store, clock, run_id="run2", machine="m2")
    second.acquire()
    assert second.took_over and second.took_over["run_id"] == "run1"
    assert not first.renew(), "the old holder sees the take-over"
    first.release()
    assert json.loads(store.data)["holder"] == second.holder, "release leaves another's lease alone"
    second.release()
    assert store.data is None


def test_a_dead_holder_on_this_machine_is_taken_over_at_once_a_live_one_or_another_machine_not():
    store, clock = MemoryStore(), Clock()
    _lease(store, clock, pid=100).acquire()
    with pytest.raises(LeaseHeldError):  # alive
        _lease(store, clock, run_id="run2", pid=200).acquire()
    with pytest.raises(LeaseHeldError):  # dead, but on another machine: cannot tell, wait for expiry
        _lease(store, clock, run_id="run2", machine="m2", alive=lambda r: False).acquire()
    second = _lease(store, clock, run_id="run2", pid=200, alive=lambda r: r["pid"] != 100)
    second.acquire()
    assert json.loads(store.data)["run_id"] == "run2"


def test_renewer_reports_a_lost_lease_once_and_tolerates_storage_errors_until_expiry():
    store, clock = MemoryStore(), Clock()
    lease = _lease(store, clock)
    lease.acquire()
    lost: list[int] = []
    renewer = Renewer(lease, on_lost=lambda: lost.append(1))
    original = store.read

    def failing():
        raise OSError("S3 503 ServiceUnavailable")
    store.read = failing  # type: ignore[method-assign]
    clock.now += 20
    assert renewer.step() and not lost, "a storage error well before expiry: try again later"
    clock.now += 35
    assert not renewer.step() and lost == [1] and "could not be renewed" in renewer.lost
    store.read = original  # type: ignore[method-assign]

    lease2 = _lease(MemoryStore(), clock, run_id="run2")
    lease2.acquire()
    lease2.store.data = json.dumps({"holder": "other", "expires_at": clock.now + 60}).encode()
    renewer2 = Renewer(lease2, on_lost=lambda: lost.append(2))
    assert not renewer2.step() and lost == [1, 2] and renewer2.lost == "another job took it over"


def test_hold_releases_and_a_lost_lease_ends_the_body_with_lease_lost_error(tmp_path):
    out = str(tmp_path / "out")
    with hold(out, "run1", "label_dataset", ttl_s=60) as lease:
        record = json.loads((tmp_path / "out" / LEASE_FILE).read_text())
        assert record["run_id"] == "run1" and record["holder"] == lease.holder
        with pytest.raises(LeaseHeldError):
            with hold(out, "run2", ttl_s=60):
                pass
    assert not (tmp_path / "out" / LEASE_FILE).exists(), "released at the end"

    interrupted = threading.Event()
    with pytest.raises(LeaseLostError, match="another job took it over"):
        with hold(out, "run3", ttl_s=0.3, on_lost=interrupted.set) as lease:
            (tmp_path / "out" / LEASE_FILE).write_text(json.dumps({"holder": "x", "expires_at": 1e12}))
            assert interrupted.wait(5)
            raise KeyboardInterrupt  # what on_lost's default (interrupt_main) raises
    assert json.loads((tmp_path / "out" / LEASE_FILE).read_text())["holder"] == "x", "not released"


def _race(make_lease, count: int = 8) -> list[str]:
    """count leases acquired from as many threads at once; the outcomes."""
    barrier, results = threading.Barrier(count), [""] * count

    def attempt(i: int) -> None:
        lease = make_lease(i)
        barrier.wait()
        try:
            lease.acquire()
            results[i] = "held"
        except LeaseHeldError:
            results[i] = "refused"
    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_local_store_one_of_many_simultaneous_jobs_wins(tmp_path):
    results = _race(lambda i: Lease(str(tmp_path), f"run{i}", LocalStore(str(tmp_path)), machine=f"m{i}"))
    assert sorted(results) == ["held"] + ["refused"] * 7


def test_s3_store_conditional_writes(s3_bucket):
    out = f"{s3_bucket}/job"
    store = S3Store(out, settle_s=0.05)
    clock = Clock()
    first = _lease(store, clock)
    first.acquire()
    assert store.read()[0] is not None and not store.create(b"{}"), "If-None-Match refuses a second lease"
    assert not store.replace(b"{}", '"not-the-etag"'), "If-Match refuses a stale version"
    clock.now += 20
    assert first.renew()
    with pytest.raises(LeaseHeldError, match="run run1"):
        _lease(store, clock, run_id="run2", machine="m2").acquire()
    clock.now += 61
    second = _lease(store, clock, run_id="run2", machine="m2")
    second.acquire()
    assert not first.renew()
    second.release()
    assert store.read() == (None, None)

    results = _race(lambda i: Lease(out, f"run{i}", S3Store(out, settle_s=0.2), machine=f"m{i}"), count=4)
    assert sorted(results) == ["held"] + ["refused"] * 3


def test_local_release_leaves_no_lease_files_and_no_folder_it_made(tmp_path):
    out = tmp_path / "new"
    with hold(str(out), "run1", ttl_s=60):
        assert sorted(os.listdir(out)) == [LEASE_FILE, LEASE_FILE + ".lock"]
    assert not out.exists(), "a job that wrote nothing leaves nothing"
    with hold(str(out), "run2", ttl_s=60):
        (out / "run.json").write_text("{}")
    assert os.listdir(out) == ["run.json"]


def test_local_leases_taken_and_released_in_a_loop_never_have_two_holders(tmp_path):
    holders, most, errors = [0], [0], []
    lock = threading.Lock()

    def worker(i: int) -> None:
        try:
            for n in range(25):
                lease = Lease(str(tmp_path / "out"), f"run{i}-{n}", LocalStore(str(tmp_path / "out")), machine=f"m{i}")
                try:
                    lease.acquire()
                except LeaseHeldError:
                    continue
                with lock:
                    holders[0] += 1
                    most[0] = max(most[0], holders[0])
                time.sleep(0.002)  # held a while: another holder now would show
                with lock:
                    holders[0] -= 1
                lease.release()
        except Exception as e:  # reported below
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and most[0] == 1, (errors, most)


def test_hold_on_an_s3_output(s3_bucket):
    out = f"{s3_bucket}/held"
    with hold(out, "run1", "train_cam", ttl_s=60):
        with pytest.raises(LeaseHeldError, match=r"run run1 \(train_cam, pid"):
            with hold(out, "run2", ttl_s=60):
                pass
    assert S3Store(out).read() == (None, None), "released"


def test_predict_is_refused_and_evaluate_warns_while_another_job_writes_the_output(tmp_path):
    """predict.py writes into its output, so it takes the lease like the labeling job; evaluate.py
    only reads, and says that a run still writing its labels is scored as far as it got."""
    from psa_ray.pipeline.predict import PredictJob, run

    out = str(tmp_path / "out")
    assert current_holder(out) is None
    with hold(out, "run1", "label_dataset", ttl_s=60):
        holder = current_holder(out)
        assert holder is not None and holder["run_id"] == "run1"
        with pytest.raises(LeaseHeldError, match="run run1 \\(label_dataset, pid"):
            run(PredictJob(checkpoint=str(tmp_path / "model.pt"), input=str(tmp_path / "photos"), output=out))
        labels, gt = tmp_path / "out" / "labels", tmp_path / "gt"
        for folder in (labels, gt):
            folder.mkdir(parents=True)
            (folder / "a.png").write_bytes(encode_label_png(np.ones((4, 4), np.uint8)))
        done = subprocess.run([sys.executable, os.path.join(REPO, "jobs", "evaluate.py"), str(labels),
                               "--gt", str(gt)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "is still being written by run run1 (label_dataset" in done.stderr
    assert current_holder(out) is None
    done = subprocess.run([sys.executable, os.path.join(REPO, "jobs", "evaluate.py"), str(labels), "--gt", str(gt)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "still being written" not in done.stderr
