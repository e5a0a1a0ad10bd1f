"""The device a run trains on: which one, in what precision, how it is described, and which code ran.

Device and precision choices are the engine's only hardware-dependent decisions; they live here so the
training loop reads the same on a CPU and a GPU.
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import torch

from worker.engine.result import DeviceInfo, EngineError, Versions


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if str(device) == "auto" else device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EngineError(f"device {device!r} requested but CUDA is not available on this machine",
                              kind="infrastructure")
        if dev.index is None:  # set_device and memory stats need an index: the process's current GPU
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX tiles), as Ampere-class GPUs do.

    Without those instructions oneDNN emulates bf16 and autocast makes a step slower, not faster. The
    instructions must also be in use: ATEN_CPU_CAPABILITY=avx2 or ONEDNN_MAX_CPU_ISA=AVX2 (how CI and a
    developer bring an AVX-512 CPU down to an AVX2 one) make this CPU behave as one without them.
    """
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    if not any(getattr(torch.cpu, name, lambda: False)() for name in checks):
        return False
    if not torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX")):
        return False
    isa = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    return isa == "ALL" or isa in ONEDNN_BF16_ISAS


# ONEDNN_MAX_CPU_ISA values at or above the first ISA with native bf16 (oneDNN's dnnl_cpu_isa_t names).
ONEDNN_BF16_ISAS = frozenset({
    "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10_1_512_AMX",
    "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2",
})


def resolve_precision(precision: str, device: torch.device) -> tuple[str, torch.dtype | None, bool]:
    """-> (name, autocast dtype or None, use GradScaler).

    "auto" means mixed precision wherever the hardware does bf16 natively: bf16 on GPUs that support it
    (fp16 with loss scaling on older ones), bf16 on CPUs with AVX512-BF16 or AMX (1.6x faster per step
    than fp32 for a width-16 ResNet18 on 2 AMD EPYC cores, see bench/learning.py), fp32 on other CPUs.
    """
    if device.type != "cuda":
        if precision == "fp16":
            raise EngineError("precision fp16 needs a CUDA device; use auto, bf16 or fp32 on CPU")
        if precision == "auto":
            precision = "bf16" if cpu_has_native_bf16() else "fp32"
        if precision == "bf16":
            return "bf16", torch.bfloat16, False
        return "fp32", None, False
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "bf16":
        return "bf16", torch.bfloat16, False
    if precision == "fp16":
        return "fp16", torch.float16, True  # fp16 gradients underflow without loss scaling
    return "fp32", None, False


def device_info(device: torch.device) -> DeviceInfo:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return DeviceInfo(type="cuda", name=props.name, memory_bytes=props.total_memory,
                          capability=f"{props.major}.{props.minor}")
    return DeviceInfo(type="cpu", name=cpu_name(), threads=torch.get_num_threads(),
                      cpu_capability=torch.backends.cpu.get_cpu_capability())


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return "CPU: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU: " + (platform.processor() or platform.machine())


_ALLOCATOR_TUNED = False


def tune_cpu_allocator() -> bool:
    """Keep freed large blocks in glibc's heap instead of returning them to the OS (once per process).

    By default glibc serves blocks over its (adaptive, at most 32 MiB) mmap threshold with fresh mmaps and
    trims freed heap memory back to the OS, so every training step pays page faults on the activations it
    allocates again: ~50,000 faults per fp32 step of a width-16 ResNet18 here, 5-15% of the step. The fix
    PyTorch's CPU tuning guide gives is a caching malloc (jemalloc, tcmalloc); these two mallopt settings
    get the same effect from glibc itself. A no-op (False) where libc is not glibc.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    _ALLOCATOR_TUNED = bool(mallopt(m_mmap_threshold, 256 << 20)) & bool(mallopt(m_trim_threshold, 1 << 30))
    return _ALLOCATOR_TUNED


def seed_everything(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def versions() -> Versions:
    import torchvision

    return Versions(
        torch=torch.__version__,
        torchvision=torchvision.__version__,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        python=sys.version.split()[0],
        hparena=code_version(),
    )


# Written by the image build (Dockerfile.gpu: --build-arg HPARENA_COMMIT=...), where there is no .git.
BUILD_COMMIT_FILE = Path(__file__).with_name("BUILD_COMMIT")


@lru_cache(maxsize=1)
def code_version() -> str:
    """The commit of the code that trains, so every result says which code produced it: the one baked into
    the image at build time, else the checkout's git revision, else "unknown"."""
    try:
        baked = BUILD_COMMIT_FILE.read_text().strip()
    except OSError:
        baked = ""
    if baked and baked != "unknown":
        return baked
    try:
        out = subprocess.run(["git", "-C", str(BUILD_COMMIT_FILE.parent), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
