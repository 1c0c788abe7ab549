"""One writer per output: a lease file, `<output>/lease.json`, held while a job writes there.

A job takes the lease before it writes anything under its output and renews it from a
background thread (every `ttl_s / 3`) until it ends, when it removes it. A second job on the same
output refuses at once with an `error:` line (`LeaseHeldError`, a UserError: exit status 2)
naming the holder (run id, host, pid) and when its lease expires. It takes over only a lease
that is no longer renewed: one past its expiry, or one whose holder ran on this machine and is
gone (a driver that was SIGKILLed: the rerun need not wait out the expiry).

How a take is made atomic on each storage:
- local folders (and network mounts with working `flock`): every read-decide-write of the lease
  runs under an exclusive `fcntl.flock` on `<output>/lease.json.lock`, and writes replace the
  file by rename;
- `s3://`: S3's conditional writes: a new lease is a PutObject with `If-None-Match: *`, a
  renewal or a take-over a PutObject with `If-Match: <the ETag read>`; S3 (and moto) refuse the
  loser with 412 (or 409 for two at once). After its write a job waits `settle_s` and reads the
  lease back: on a store that ignores the conditions the later of two writers keeps it and the
  earlier one sees another holder and refuses.

The clock is the wall clock of each job's machine (`time.time`): machines whose clocks differ
by more than a fraction of `ttl_s` may take over each other's leases early. A holder that cannot
renew (its storage failing past the expiry, or the lease taken by another job after the holder
stalled for longer than `ttl_s`) calls `on_lost`; `hold` then ends the job with `LeaseLostError`.
Plain logic: no Ray.
"""
from __future__ import annotations

import _thread
import json
import os
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from collections.abc import Callable, Iterator
from typing import Any

from psa_ray.errors import UserError
from psa_ray.io.redact import redact
from psa_ray.io.lease_stores import LEASE_FILE, LeaseStore, store_for
from psa_ray.io.storage import join, read_bytes

TTL_ENV = "PSA_RAY_LEASE_TTL_S"  # the lease's time to live (seconds); default LEASE_TTL_S
LEASE_TTL_S = 60.0


class LeaseHeldError(UserError):
    """Another job holds the output's lease."""


class LeaseLostError(UserError):
    """This job's lease was taken over (or could not be renewed before it expired)."""


def _machine() -> str:
    """This machine and PID namespace: a holder recorded with the same one is a process we can
    look up (`_alive`)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{socket.gethostname()}/{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return socket.gethostname()


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc), None where unknown: with the
    pid it names a process, even once the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(record: dict[str, Any]) -> bool:
    """Whether the process that wrote the lease record (on this machine) still runs."""
    pid = int(record.get("pid", 0))
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = record.get("pid_start")
    return started is None or _start_time(pid) in (None, started)


def _stale(record: dict[str, Any], now: float, machine: str, alive: Callable[[dict[str, Any]], bool]) -> bool:
    """Whether a lease record may be taken over: expired, or its holder gone from this machine."""
    if float(record.get("expires_at", 0)) <= now:
        return True
    return record.get("machine") == machine and not alive(record)


def holder_text(record: dict[str, Any]) -> str:
    """Who holds a lease, for people: `run <id> (<job>, pid <pid> on <host>)`."""
    return (f"run {record.get('run_id', '?')} ({record.get('job') or 'a psa_ray job'}, "
            f"pid {record.get('pid', '?')} on {record.get('host', '?')})")


def current_holder(output_uri: str) -> dict[str, Any] | None:
    """The lease record of the job writing to output_uri now; None when no job holds it (no
    lease, or one expired or whose process on this machine is gone). Read without the lease's
    lock: good for a warning, not for taking the lease."""
    try:
        data = read_bytes(join(output_uri, LEASE_FILE))
    except FileNotFoundError:
        return None
    record = _parse(data)
    return None if _stale(record, time.time(), _machine(), _alive) else record


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def lease_ttl() -> float:
    """The lease's time to live: PSA_RAY_LEASE_TTL_S, else LEASE_TTL_S."""
    value = os.environ.get(TTL_ENV)
    try:
        ttl = float(value) if value else LEASE_TTL_S
    except ValueError:
        raise UserError(f"{TTL_ENV} must be a number of seconds, got {value!r}") from None
    if ttl <= 0:
        raise UserError(f"{TTL_ENV} must be positive, got {value!r}")
    return ttl


@dataclass
class Lease:
    """One job's claim on an output (`acquire`, `renew`, `release`); `store`, `clock`, `sleep` and
    `alive` are injectable for tests."""

    output: str
    run_id: str
    store: LeaseStore
    ttl_s: float = LEASE_TTL_S
    job: str = ""
    clock: Callable[[], float] = field(default=time.time, repr=False)
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    alive: Callable[[dict[str, Any]], bool] = field(default=_alive, repr=False)
    holder: str = field(default_factory=lambda: uuid.uuid4().hex)
    machine: str = field(default_factory=_machine)
    pid: int = field(default_factory=os.getpid)
    _version: Any = field(default=None, repr=False)
    _acquired: float = field(default=0.0, repr=False)
    expires_at: float = 0.0
    took_over: dict[str, Any] | None = None  # the record of the expired or dead lease taken over

    def _record(self, now: float) -> bytes:
        expires = now + self.ttl_s
        return json.dumps({
            "holder": self.holder, "run_id": self.run_id, "job": self.job,
            "host": self.machine.split("/", 1)[0], "machine": self.machine, "pid": self.pid,
            "pid_start": _start_time(self.pid), "acquired": _iso(self._acquired or now),
            "renewed": _iso(now), "expires": _iso(expires), "expires_at": expires, "ttl_s": self.ttl_s,
        }, indent=2).encode()

    def _stale(self, record: dict[str, Any], now: float) -> bool:
        return _stale(record, now, self.machine, self.alive)

    def _refusal(self, record: dict[str, Any], now: float) -> LeaseHeldError:
        left = max(0, round(float(record.get("expires_at", 0)) - now))
        return LeaseHeldError(
            f"{redact(self.output)} is being written by another job: {holder_text(record)} holds its lease "
            f"({LEASE_FILE}) until {record.get('expires', '?')} ({left} s from now; it renews it while it "
            "runs). Wait for that job to end, or use another --output; a lease that is not renewed expires "
            "and the next job takes it over")

    def acquire(self) -> None:
        """Take the lease, or raise LeaseHeldError naming its holder."""
        for _ in range(5):  # another job changed the lease between our read and our write
            now = self.clock()
            self._acquired = now
            data, version = self.store.read()
            if data is None:
                won = self.store.create(self._record(now))
                previous = None
            else:
                previous = _parse(data)
                if not self._stale(previous, now):
                    raise self._refusal(previous, now)
                won = self.store.replace(self._record(now), version)
            if not won:
                continue
            if self.store.settle_s:
                self.sleep(self.store.settle_s)
            data, version = self.store.read()
            record = _parse(data) if data is not None else {}
            if record.get("holder") != self.holder:  # a store that ignored the condition: we lost
                raise self._refusal(record, self.clock())
            self._version, self.expires_at, self.took_over = version, float(record["expires_at"]), previous
            return
        raise LeaseHeldError(f"{redact(self.output)}: other jobs keep taking its lease ({LEASE_FILE}); "
                             "is the same job running several times?")

    def renew(self) -> bool:
        """Extend the lease by ttl_s; False if another job holds it now (taken over)."""
        now = self.clock()
        data, version = self.store.read()
        if data is None or _parse(data).get("holder") != self.holder:
            return False
        if not self.store.replace(self._record(now), version):
            return False
        self._version, self.expires_at = self.store.read()[1], now + self.ttl_s
        return True

    def release(self) -> None:
        """Remove the lease if this job still holds it."""
        data, version = self.store.read()
        if data is not None and _parse(data).get("holder") == self.holder:
            self.store.delete(version)


def _parse(data: bytes) -> dict[str, Any]:
    try:
        record = json.loads(data)
    except ValueError:
        record = None
    # an unreadable lease (a partial write by a foreign tool) counts as expired
    return record if isinstance(record, dict) else {"expires_at": 0}


class Renewer:
    """Renews a held lease every ttl_s / 3 in a daemon thread; calls on_lost once if the lease was
    taken over, or could not be renewed (storage errors) until it expired."""

    def __init__(self, lease: Lease, on_lost: Callable[[], None]):
        self.lease, self.on_lost = lease, on_lost
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="psa-ray-lease", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def step(self) -> bool:
        """One renewal; False once the lease is lost (after calling on_lost)."""
        try:
            if self.lease.renew():
                return True
            self.lost = "another job took it over"
        except Exception as e:  # storage trouble: retried until the lease expires
            if self.lease.clock() < self.lease.expires_at - self.lease.ttl_s / 6:
                return True
            self.lost = f"it could not be renewed before it expired ({redact(str(e))})"
        self.on_lost()
        return False

    def _run(self) -> None:
        while not self._stop.wait(self.lease.ttl_s / 3):
            if not self.step():
                return


def _interrupt_main() -> None:
    _thread.interrupt_main()


@contextmanager
def hold(output_uri: str, run_id: str, job: str = "", *, store: LeaseStore | None = None,
         ttl_s: float | None = None, on_lost: Callable[[], None] = _interrupt_main) -> Iterator[Lease]:
    """The output's lease for the body's duration: LeaseHeldError at once if another job holds it,
    renewed in the background, removed at the end. If it is lost meanwhile, the main thread is
    interrupted and the body ends with LeaseLostError."""
    lease = Lease(output_uri, run_id, store or store_for(output_uri), ttl_s or lease_ttl(), job)
    lease.acquire()
    if lease.took_over:
        print(f"lease: took over the lease of run {lease.took_over.get('run_id', '?')} "
              f"(pid {lease.took_over.get('pid', '?')} on {lease.took_over.get('host', '?')}): expired, "
              "or its process is gone", file=sys.stderr, flush=True)
    renewer = Renewer(lease, on_lost)
    renewer.start()
    try:
        yield lease
    except BaseException:  # the interrupt, or what the code it stopped made of it
        if renewer.lost:
            raise LeaseLostError(f"this job stopped: its lease on {redact(output_uri)} was lost "
                                 f"({renewer.lost}); the job now holding it goes on") from None
        raise
    finally:
        renewer.stop()
        if not renewer.lost:
            lease.release()
