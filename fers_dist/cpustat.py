"""Where the CPU went while a block of code ran, for the benchmarks.

``with CPUAccount() as acc: ...`` then ``acc.summary()`` gives the machine's busy CPU-seconds (from
``/proc/stat``, exact) and the CPU-seconds of each process that ran meanwhile, summed by role:

- ``driver``: this process;
- ``map_workers``: Ray Data's map workers (``ray::MapWorker(...)`` actors and ``ray::MapBatches``
  tasks), start-up included;
- ``ray_data_internal``: Ray Data's own helper actors, started on a session's first dataset
  (``_StatsActor``, ``_AutoscalingCoordinatorActor``, ``ActorLocationTracker``);
- ``ray_workers_other``: any other Ray worker (idle pool workers, other actors), and a map task that
  started and finished between two samples (its worker is only ever seen idle);
- ``ray_system``: Ray's daemons (raylet, GCS, agents, log monitor);
- ``other``: everything else on the machine (on a shared machine: other people's work).

Processes are sampled from a thread every ``interval`` seconds, so one that exits between two samples
loses at most that much of its CPU. A sample costs the driver about 2 ms of CPU (1% of a core at the
default 0.2 s). Linux only (it reads ``/proc``); elsewhere ``summary()`` is ``{}``.
Ray-free: it only reads process names.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

_PROC = Path("/proc")
RAY_DATA_INTERNAL = ("ray::_StatsActor", "ray::_AutoscalingCoordinatorActor", "ray::ActorLocationTracker")


def available() -> bool:
    return (_PROC / "stat").is_file()


def machine_busy_s() -> float:
    """CPU-seconds spent not idle (user + nice + system + irq + softirq + steal) since boot, all CPUs."""
    f = (_PROC / "stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _read(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def _sample(names: dict[int, str] | None = None) -> dict[int, tuple[float, str]]:
    """pid -> (CPU-seconds so far, command line) for every readable process. Command lines already in
    ``names`` are reused unless the process may still be renamed (a Ray worker is ``ray::IDLE``
    until its actor or task starts); that halves the cost of a sample. Once named, a process keeps its
    name, so a task worker that goes back to ``ray::IDLE`` still counts as the map worker it was."""
    tick = os.sysconf("SC_CLK_TCK")
    names = names or {}
    out = {}
    for entry in os.scandir(_PROC):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            stat = _read(f"/proc/{pid}/stat")
            cmd = names.get(pid, "")
            if not cmd or cmd.startswith("ray::IDLE") or "default_worker" in cmd:
                cmd = _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # exited while we looked
            continue
        fields = stat[stat.rindex(b")") + 2:].split()  # after "pid (comm) "; utime, stime are fields 14, 15
        out[pid] = ((int(fields[11]) + int(fields[12])) / tick, cmd)
    return out


def role(pid: int, cmd: str, driver: int) -> str:
    if pid == driver:
        return "driver"
    if cmd.startswith(("ray::MapWorker", "ray::MapBatches")):
        return "map_workers"
    if cmd.startswith(RAY_DATA_INTERNAL):
        return "ray_data_internal"
    if cmd.startswith("ray::") or "default_worker" in cmd:  # a Ray worker before it names itself
        return "ray_workers_other"
    if "/ray/" in cmd or "ray/core/src" in cmd:
        return "ray_system"
    return "other"


class CPUAccount:
    """Context manager: per-role CPU-seconds and the machine's busy CPU-seconds over its block."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self._ok = available()
        self._base: dict[int, float] = {}
        self._last: dict[int, tuple[float, str]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._busy = 0.0

    def _update(self) -> None:
        self._last.update(_sample({pid: cmd for pid, (_, cmd) in self._last.items()}))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._update()

    def __enter__(self) -> CPUAccount:  # noqa: PYI034  (Self needs Python 3.11; 3.10 is supported)
        if self._ok:
            self._base = {pid: cpu for pid, (cpu, _) in _sample().items()}
            self._busy = machine_busy_s()
            self._thread = threading.Thread(target=self._run, name="cpu-account", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._update()
            self._busy = machine_busy_s() - self._busy

    def summary(self) -> dict[str, float]:
        """{"machine_busy": s, "driver": s, "map_workers": s, ...}, rounded to 0.01 s; {} off Linux."""
        if not self._ok:
            return {}
        roles: dict[str, float] = {}
        me = os.getpid()
        for pid, (cpu, cmd) in self._last.items():
            used = cpu - self._base.get(pid, 0.0)
            if used > 0:
                r = role(pid, cmd, me)
                roles[r] = roles.get(r, 0.0) + used
        order = ("driver", "map_workers", "ray_data_internal", "ray_workers_other", "ray_system", "other")
        return {"machine_busy": round(self._busy, 2), **{r: round(roles[r], 2) for r in order if r in roles}}
