"""What device a run measured, and the short name of its results folder."""
from __future__ import annotations

import os
import platform
import re
from typing import Dict

import torch


def _meminfo(key: str) -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_info(device: torch.device) -> Dict:
    info = {"type": device.type, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        info.update(name=props.name, total_memory_bytes=int(total), available_memory_bytes=int(free),
                    capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                    l2_cache_bytes=int(getattr(props, "L2_cache_size", 0) or 0))
    else:
        info.update(name=f"{cpu_name()} ({os.cpu_count()} cores)", cores=os.cpu_count(),
                    total_memory_bytes=_meminfo("MemTotal:"), available_memory_bytes=_meminfo("MemAvailable:"))
    return info


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    text = re.sub(r"\((r|tm)\)", "", name.lower())
    text = re.sub(r"[^a-z0-9]+", "-", text).strip("-")
    return text or "device"
