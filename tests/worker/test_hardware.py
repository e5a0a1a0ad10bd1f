"""A worker's device against its hardware class: the check on real devices' figures, the probe process on
this machine, a worker's share of the node's cores, and a finished run's device-mismatch flag."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select

from app.admin.models import HardwareClass
from app.hardware import check_device, check_probe, parse_cpu_max, thread_share
from tests.conftest import reset_caches
from tests.factories import cpu_class, join, make_competition, make_organizer
from worker.engine.result import DeviceInfo
from worker.probe import run_probe

# What torch reports for real devices (get_device_properties: name, total_memory, capability).
H100_SXM = DeviceInfo(type="cuda", name="NVIDIA H100 80GB HBM3", memory_bytes=85_045_624_832, capability="9.0")
H100_PCIE = DeviceInfo(type="cuda", name="NVIDIA H100 PCIe", memory_bytes=85_031_714_816, capability="9.0")
H200 = DeviceInfo(type="cuda", name="NVIDIA H200", memory_bytes=150_110_011_392, capability="9.0")
A100_40 = DeviceInfo(type="cuda", name="NVIDIA A100-SXM4-40GB", memory_bytes=42_505_273_344, capability="8.0")
A100_80 = DeviceInfo(type="cuda", name="NVIDIA A100-SXM4-80GB", memory_bytes=85_097_971_712, capability="8.0")
L4 = DeviceInfo(type="cuda", name="NVIDIA L4", memory_bytes=23_580_639_232, capability="8.9")
T4 = DeviceInfo(type="cuda", name="Tesla T4", memory_bytes=15_828_320_256, capability="7.5")
EPYC = DeviceInfo(type="cpu", name="CPU: AMD EPYC 7B13", threads=2, cpu_capability="AVX2")
XEON = DeviceInfo(type="cpu", name="CPU: Intel(R) Xeon(R) Platinum 8481C", threads=2, cpu_capability="AVX512")


@pytest.fixture
def classes(db) -> dict[str, HardwareClass]:
    """The classes migration 0007 seeds."""
    return {c.name: c for c in db.scalars(select(HardwareClass))}


@pytest.mark.parametrize(("device", "auto", "cls"), [
    (H100_SXM, "bf16", "h100-80gb"), (H100_PCIE, "bf16", "h100-80gb"), (H200, "bf16", "h200"),
    (A100_40, "bf16", "a100-40gb"), (A100_80, "bf16", "a100-80gb"), (L4, "bf16", "l4"),
    (EPYC, "fp32", "cpu"), (EPYC, "fp32", "cpu-avx2"), (XEON, "bf16", "cpu"), (XEON, "bf16", "cpu-avx512"),
])
def test_each_device_serves_its_own_class(classes, device, auto, cls):
    assert check_device(classes[cls], device, auto, device.cpu_capability) is None


@pytest.mark.parametrize(("device", "auto", "cls", "why"), [
    (A100_80, "bf16", "h100-80gb", "its name does not match /H100/"),
    (A100_40, "bf16", "a100-80gb", "it has 39.6 GiB of memory, outside 75-82 GiB"),
    (A100_80, "bf16", "a100-40gb", "it has 79.3 GiB of memory, outside 36-42 GiB"),
    (H200, "bf16", "h100-80gb", "its name does not match /H100/; it has 139.8 GiB of memory, outside 75-82 GiB"),
    (T4, "fp16", "l4", "its name does not match /L4/; it has 14.7 GiB of memory, outside 20-24 GiB; "
                       'precision "auto" resolves to fp16 on it, not bf16'),
    (EPYC, "fp32", "h100-80gb", "it is a cpu device, not cuda"),
    (H100_SXM, "bf16", "cpu", "it is a cuda device, not cpu"),
    (EPYC, "fp32", "cpu-avx512", "it runs ATen's AVX2 CPU kernels, not AVX512"),
    (XEON, "bf16", "cpu-avx2", 'precision "auto" resolves to bf16 on it, not fp32; it runs ATen\'s AVX512 CPU '
                               "kernels, not AVX2"),
])
def test_a_device_of_another_class_is_refused_in_plain_words(classes, device, auto, cls, why):
    problem = check_device(classes[cls], device, auto, device.cpu_capability)
    assert problem == f"{device.name} is not hardware class {cls!r}: {why}"


def test_an_unknown_precision_or_capability_is_not_guessed(classes):
    # A finished run that chose its own precision says nothing of what auto gives: not checked.
    assert check_device(classes["l4"], L4, None, None) is None
    # A CPU class that needs a capability is not served by a CPU whose capability is unknown.
    assert "CPU capability is unknown" in check_device(classes["cpu-avx512"], EPYC, "fp32", None)


def _probe_env(**extra: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("HPARENA_", "ATEN_", "ONEDNN_"))} | extra


@pytest.fixture(scope="module")
def probes():
    """`python -m worker.probe` on this machine, as it is, brought down to AVX2, and asked for CUDA."""
    envs = {"as_is": _probe_env(HPARENA_DEVICE="cpu"),
            "avx2": _probe_env(HPARENA_DEVICE="cpu", ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2"),
            "cuda": _probe_env(HPARENA_DEVICE="cuda")}
    with ThreadPoolExecutor(len(envs)) as pool:
        return dict(zip(envs, pool.map(lambda env: run_probe(120, env), envs.values()), strict=True))


@pytest.mark.slow  # three probe processes, each importing torch
def test_the_probe_describes_this_machine_from_a_process_of_its_own(probes, classes):
    import torch

    p = probes["as_is"]
    assert p.error is None and p.device.type == "cpu" and p.device.name.startswith("CPU: ")
    assert p.device.cpu_capability == p.cpu_capability == torch.backends.cpu.get_cpu_capability()
    assert p.auto_precision == ("bf16" if p.cpu_capability.startswith(("AVX512", "AMX")) and
                                torch.cpu._is_avx512_bf16_supported() else "fp32")
    assert check_probe(classes["cpu"], "cpu", p) is None
    assert check_probe(classes["h100-80gb"], "h100-80gb", p).endswith("it is a cpu device, not cuda")
    assert check_probe(None, "h100-80gb", p).startswith("hardware class 'h100-80gb' is not defined")

    avx2 = probes["avx2"]  # what an AVX2-only CPU (this project's AMD EPYC) reports
    assert (avx2.cpu_capability, avx2.auto_precision) == ("AVX2", "fp32")
    assert check_probe(classes["cpu-avx2"], "cpu-avx2", avx2) is None
    assert check_probe(classes["cpu-avx512"], "cpu-avx512", avx2).endswith("ATen's AVX2 CPU kernels, not AVX512")


@pytest.mark.slow  # the probe processes
def test_a_probe_that_finds_no_device_refuses_with_the_reason(probes, classes):
    if probes["cuda"].device is not None:
        pytest.skip("this machine has CUDA")
    problem = check_probe(classes["h100-80gb"], "h100-80gb", probes["cuda"])
    assert problem == ("cannot serve hardware class 'h100-80gb': device 'cuda' requested but CUDA is not "
                       "available on this machine")


# ---- a worker's share of the node ---------------------------------------------------------------------


def _share_in_child(setting: int, cores: set[int] | None) -> int:
    """thread_share as a process pinned to `cores` (a container's cpuset, taskset) computes it."""
    code = f"from app.hardware import thread_share; print(thread_share({setting}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
    return int(out.stdout)


@pytest.mark.slow  # three Python processes
def test_a_worker_takes_the_cores_it_is_given():
    mine = os.sched_getaffinity(0)
    assert _share_in_child(0, {min(mine)}) == 1  # pinned to one core: one thread, whatever the node has
    assert _share_in_child(0, None) == thread_share(0) <= len(mine)
    assert _share_in_child(3, {min(mine)}) == 3  # HPARENA_WORKER_THREADS is taken as given


@pytest.mark.parametrize(("text", "cpus"), [("max 100000\n", None), ("150000 100000\n", 1.5),
                                             ("200000 100000", 2.0), ("50000 100000", 0.5), ("", None)])
def test_a_cgroup_quota_is_read_in_cpus(text, cpus):
    assert parse_cpu_max(text) == cpus


# ---- the task ------------------------------------------------------------------------------------------


def test_a_worker_whose_check_failed_leaves_the_token_in_the_queue(client, admin_headers, monkeypatch):
    import worker.celery_app
    from worker.tasks import train_run

    # What the start-up check leaves in the parent, and so in every child it forks.
    monkeypatch.setattr(worker.celery_app, "_hardware_problem", "CPU: x is not hardware class 'h100-80gb'")
    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org, seeds=[0])
    student = join(client, comp["slug"])
    r = client.post(f"/api/competitions/{comp['slug']}/submissions", json={"config": {"batch_size": 32}},
                    headers=student)
    assert train_run.apply().state == "REJECTED"  # requeued for a worker whose device is the class
    assert client.get(f"/api/submissions/{r.json()['id']}", headers=student).json()["status"] == "queued"


@pytest.mark.slow
def test_a_run_on_the_wrong_device_is_flagged_and_trains_with_its_thread_share(
        client, admin_headers, database_url, tiny_cifar, monkeypatch):
    import torch

    from worker.tasks import train_run

    # A CPU class whose name pattern no CPU matches, served by this process (as a misconfigured node would).
    hw = f"t{uuid.uuid4().hex[:8]}"
    cpu_class(database_url, hw, name_pattern="^NoSuchCPU")
    monkeypatch.setenv("HPARENA_HARDWARE_CLASS", hw)
    monkeypatch.setenv("HPARENA_WORKER_THREADS", "1")
    reset_caches()
    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org, seeds=[0], hardware_class=hw, budget={"max_epochs": 1},
                            dataset={"name": "cifar10", "path": str(tiny_cifar)})
    student = join(client, comp["slug"])
    r = client.post(f"/api/competitions/{comp['slug']}/submissions",
                    json={"config": {"epochs": 1, "batch_size": 32}}, headers=student)
    assert r.status_code == 201, r.text
    threads = torch.get_num_threads()
    try:
        assert train_run.apply().get() == "succeeded"
    finally:
        torch.set_num_threads(threads)

    detail = client.get(f"/api/submissions/{r.json()['id']}", headers=student).json()
    (run,) = detail["runs"]
    assert run["device_mismatch"].startswith("CPU: ") and "does not match /^NoSuchCPU/" in run["device_mismatch"]
    assert detail["device_mismatch"] is True
    assert run["result"]["device"]["threads"] == 1
    (node,) = client.get("/api/admin/workers", headers=admin_headers).json()["workers"]
    assert node["threads"] == 1
    board = client.get(f"/api/competitions/{comp['slug']}/leaderboard").json()
    assert [e["device_mismatch"] for e in board["entries"]] == [True]
