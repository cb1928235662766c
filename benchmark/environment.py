"""The environment probe of a run: versions, host, git commit and devices (the record's ``env``)."""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np


@contextlib.contextmanager
def exact_float32():
    """IEEE float32 for every matmul and convolution inside (restored on exit): on CUDA, PyTorch runs
    float32 convolutions as TF32 by default (``torch.backends.cudnn.allow_tf32``; 10-bit mantissa on
    Ampere and later), which a record labelled ``fp32`` would hide. A bf16 run's autocast regions are
    bf16 either way; its float32 remainder (evaluation, which is float32 by contract) is exact too.
    On a CPU nothing changes (the flags act on CUDA only)."""
    import torch

    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul



def _pkg_version(name: str) -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version(name)
        except PackageNotFoundError:
            return None
    except Exception:  # noqa: BLE001 - never fail
        return None


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        r = subprocess.run(
            ["git", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"},
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            r = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5)
            if r.returncode == 0 and r.stdout.strip():
                return r.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or None


def environment_info() -> dict:
    """Versions, host, git commit and devices of this process. Never raises."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "numpy": np.__version__,
        "pandas": _pkg_version("pandas"),
        "torch": _pkg_version("torch"),
        "torchvision": _pkg_version("torchvision"),
        "timm": _pkg_version("timm"),
        "ensemble_bench": None,
        "git_commit": None,
        "git_dirty": None,
        "cpu": None,
        "cpu_count": os.cpu_count(),
        "cuda": None,
        "cudnn": None,
        "cuda_device": None,
        "cuda_device_count": 0,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }
    try:
        from ensemble_bench import __version__

        info["ensemble_bench"] = __version__
    except Exception:  # noqa: BLE001
        pass
    try:
        info["cpu"] = _cpu_model()
    except Exception:  # noqa: BLE001
        pass
    try:
        here = Path(__file__).resolve().parent
        head = _git(["rev-parse", "--verify", "-q", "HEAD"], here)
        info["git_commit"] = head.strip() or None if head is not None else None
        status = _git(["status", "--porcelain", "--untracked-files=no"], here)
        if status is not None:
            info["git_dirty"] = bool(status.strip())
    except Exception:  # noqa: BLE001
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        if torch.backends.cudnn.is_available():
            info["cudnn"] = torch.backends.cudnn.version()
        if torch.cuda.is_available():
            info["cuda_device_count"] = torch.cuda.device_count()
            info["cuda_device"] = torch.cuda.get_device_name(torch.cuda.current_device())
    except Exception:  # noqa: BLE001
        pass
    return info

