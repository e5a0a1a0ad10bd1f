"""Probe the device a worker would train on, in a process of its own: `python -m worker.probe`.

Prints one JSON line (app.hardware.Probe): the device's DeviceInfo, what precision "auto" resolves to on
it, and ATen's CPU capability. The worker's parent runs it at start-up (`run_probe`) rather than looking
itself: the parent forks the pool's children, and a CUDA driver initialised before a fork is unusable in
them. The probe sees the worker's environment (HPARENA_DEVICE, ATEN_CPU_CAPABILITY, CUDA_VISIBLE_DEVICES).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping

from app.hardware import Probe


def probe(device: str) -> Probe:
    """Runs in the probe process: torch (and CUDA) load here."""
    import torch

    from worker.engine.device import device_info, resolve_device, resolve_precision
    from worker.engine.result import EngineError

    capability = torch.backends.cpu.get_cpu_capability()
    try:
        dev = resolve_device(device)
        return Probe(device=device_info(dev), auto_precision=resolve_precision("auto", dev)[0],
                     cpu_capability=capability)
    except (EngineError, RuntimeError) as e:  # cuda asked for and absent, a broken driver
        return Probe(cpu_capability=capability, error=str(e))


def run_probe(timeout: float, env: Mapping[str, str] | None = None) -> Probe:
    """Run the probe in a child process (the caller never imports torch) and read what it printed. It sees
    this process's environment, or `env`."""
    try:
        out = subprocess.run([sys.executable, "-m", "worker.probe"], capture_output=True, text=True,
                             timeout=timeout, env=None if env is None else dict(env))
    except subprocess.TimeoutExpired:
        return Probe(error=f"the device probe did not answer within {timeout:g} s")
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
        return Probe(error=f"the device probe failed: {tail}")
    return Probe.model_validate_json(lines[-1])


def main() -> None:
    import torch

    from app.config import get_settings
    from app.hardware import thread_share

    settings = get_settings()
    torch.set_num_threads(thread_share(settings.worker_threads))  # DeviceInfo.threads: what a run would use
    print(probe(settings.device).model_dump_json())


if __name__ == "__main__":
    main()
