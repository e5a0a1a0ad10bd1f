"""Hardware classes: what a device must be to serve a class, and how much of a node a worker takes.

A class (app.admin.models.HardwareClass) names the device type, a device-name pattern, a memory range,
the precision `auto` must resolve to and, on a CPU, the ATen CPU capability. A worker checks its real
device against its class at start-up (worker.celery_app, with the facts worker.probe measures in a
process of its own) and refuses to consume on a mismatch; every finished run is checked again, and the
board flags a result whose device was not its competition's class.

No torch here: the API imports this module, and the worker's parent process must never load CUDA.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.admin.models import HardwareClass
from app.errors import InvalidField
from worker.engine.result import DeviceInfo, TrainResult

# A class's name is a queue's suffix (train.<name>) and a path segment.
CLASS_NAME = r"^[a-z0-9][a-z0-9_-]{0,48}$"
GIB = 1024**3


def get_class(session: Session, name: str) -> HardwareClass | None:
    return session.get(HardwareClass, name) if re.fullmatch(CLASS_NAME, name) else None


def class_names(session: Session) -> list[str]:
    return list(session.scalars(select(HardwareClass.name).order_by(HardwareClass.name)))


def require_class(session: Session, name: str, field: str = "hardware_class") -> HardwareClass:
    """The class called `name`; InvalidField (422 at `field`, listing the defined classes) if there is none."""
    cls = get_class(session, name)
    if cls is None:
        known = class_names(session)
        raise InvalidField(field, name, f"no hardware class {name!r}; defined: {', '.join(known)} (an admin "
                                        f"defines another with PUT /api/admin/hardware-classes/{name})", known)
    return cls


def class_of_queue(queue: str) -> str:
    """The class a queue serves: train.<class> (app.config.Settings.queue_for)."""
    return queue.removeprefix("train.")


def cost_unit(device_type: str) -> str:
    """What a run's device-seconds are on a class of this device type: GPU-seconds, or CPU-seconds."""
    return "cpu-seconds" if device_type == "cpu" else "gpu-seconds"


def class_cost_unit(session: Session, name: str) -> str:
    """cost_unit of the class called `name` (gpu-seconds for a class not defined)."""
    device_type = session.scalar(select(HardwareClass.device_type).where(HardwareClass.name == name))
    return cost_unit(device_type or "cuda")


def hours_unit(session: Session, name: str) -> str:
    """The same unit counted in hours (gpu-hours, cpu-hours), as the board shows it."""
    return class_cost_unit(session, name).removesuffix("-seconds") + "-hours"


# ----------------------------------------------------------------------------------------------------
# Does this device serve this class?
# ----------------------------------------------------------------------------------------------------


def check_device(cls: HardwareClass, device: DeviceInfo, auto_precision: str | None,
                 cpu_capability: str | None) -> str | None:
    """Why `device` is not a device of class `cls`, in plain words; None when it is.

    `auto_precision` is what precision "auto" resolves to on it (None: not known, not checked, as for a
    finished run that chose its precision itself); `cpu_capability` is the ATen CPU capability it runs
    with (torch.backends.cpu.get_cpu_capability(): DEFAULT, AVX2, AVX512, ...), checked on CPU classes.
    """
    if device.type != cls.device_type:
        return f"{device.name} is not hardware class {cls.name!r}: it is a {device.type} device, not {cls.device_type}"
    problems = []
    if cls.name_pattern and not re.search(cls.name_pattern, device.name, re.IGNORECASE):
        problems.append(f"its name does not match /{cls.name_pattern}/")
    if cls.min_memory_gib is not None or cls.max_memory_gib is not None:
        lo = 0 if cls.min_memory_gib is None else cls.min_memory_gib
        hi = math.inf if cls.max_memory_gib is None else cls.max_memory_gib
        if device.memory_bytes is None:
            problems.append(f"it reports no memory size (the class needs {_range(lo, hi)} GiB)")
        elif not lo <= device.memory_bytes / GIB <= hi:
            problems.append(f"it has {device.memory_bytes / GIB:.1f} GiB of memory, outside {_range(lo, hi)} GiB")
    if cls.precision is not None and auto_precision is not None and auto_precision != cls.precision:
        problems.append(f'precision "auto" resolves to {auto_precision} on it, not {cls.precision}')
    if cls.device_type == "cpu" and cls.cpu_capability:
        if cpu_capability is None:
            problems.append(f"its CPU capability is unknown (the class needs {cls.cpu_capability})")
        elif not cpu_capability.upper().startswith(cls.cpu_capability.upper()):
            problems.append(f"it runs ATen's {cpu_capability} CPU kernels, not {cls.cpu_capability}")
    if not problems:
        return None
    return f"{device.name} is not hardware class {cls.name!r}: " + "; ".join(problems)


def _range(lo: float, hi: float) -> str:
    return f"{lo:g}-{hi:g}" if hi != math.inf else f"at least {lo:g}"


def check_result(cls: HardwareClass | None, name: str, result: TrainResult) -> str | None:
    """Why the device a finished run trained on is not its competition's class `name` (None: it is)."""
    if cls is None:
        return f"hardware class {name!r} is not defined"
    # The precision "auto" resolved to is known only when the run asked for auto.
    auto = result.precision if result.spec.config.precision == "auto" else None
    return check_device(cls, result.device, auto, result.device.cpu_capability)


class Probe(BaseModel):
    """What `python -m worker.probe` measures of the device a worker would train on."""

    device: DeviceInfo | None = None
    auto_precision: str | None = None  # what precision "auto" resolves to on it
    cpu_capability: str | None = None  # ATen's CPU capability in this process (DEFAULT, AVX2, AVX512, ...)
    error: str | None = None  # why there is no device to describe (e.g. cuda asked for, none present)


def check_probe(cls: HardwareClass | None, name: str, probe: Probe) -> str | None:
    """A worker's start-up check: why it must not serve class `name` (None: it may)."""
    if cls is None:
        return (f"hardware class {name!r} is not defined (HPARENA_HARDWARE_CLASS); an admin defines it with "
                f"PUT /api/admin/hardware-classes/{name}")
    if probe.error is not None or probe.device is None:
        return f"cannot serve hardware class {name!r}: {probe.error or 'the device probe said nothing'}"
    return check_device(cls, probe.device, probe.auto_precision, probe.cpu_capability)


# ----------------------------------------------------------------------------------------------------
# A worker's share of the node
# ----------------------------------------------------------------------------------------------------


def thread_share(setting: int = 0) -> int:
    """How many threads a worker's training uses: `setting` (HPARENA_WORKER_THREADS) when positive; else
    the cores this process may run on (its CPU affinity: a container's cpuset, taskset), capped by its
    cgroup v2 CPU quota (cpu.max) if one is set. N workers on one node each get their own cores this way
    instead of all of them using every core (two CPU workers on two cores ran each run 4x slower)."""
    if setting > 0:
        return setting
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, math.floor(quota))
    return max(1, cores)


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs' worth of time this process's cgroup v2 may use (cpu.max), or None when unlimited or unknown."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    own = next((line[3:] for line in lines if line.startswith("0::")), None)
    if own is None:  # cgroup v1: no cpu.max
        return None
    for d in (root / own.lstrip("/"), root):
        try:
            return parse_cpu_max((d / "cpu.max").read_text())
        except OSError:
            continue
    return None


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2's cpu.max ("150000 100000": 1.5 CPUs; "max 100000": unlimited) as CPUs, None when unlimited."""
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    period = float(parts[1]) if len(parts) > 1 else 100000.0
    return float(parts[0]) / period if period > 0 else None
