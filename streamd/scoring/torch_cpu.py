"""The one place that asks torch's private CPU API about the hardware (torch 2.x)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path

import torch


def amx_available() -> bool:
    """Whether this CPU has AMX tiles for bf16 matrix work (Sapphire Rapids and later).

    Why private API: torch has no public "does this CPU do AMX" call, and
    ``torch._C._cpu._init_amx()`` (checked on torch 2.13.0+cpu) also asks Linux for
    permission to use the AMX tile state, which the ``/proc/cpuinfo`` flag alone does not
    prove. Where a torch lacks it, or it raises, the CPU flag decides.
    """
    init_amx = getattr(torch._C._cpu, "_init_amx", None)
    if init_amx is not None:
        try:
            return bool(init_amx())
        except RuntimeError:
            pass
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask (systemd ``CPUAffinity=``, taskset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def configure_threads(requested: int, environ: Mapping[str, str] = os.environ) -> int:
    """Set torch's CPU threads once, before the model runs; returns the intra-op count.

    ``requested`` > 0 is used as is; 0 keeps ``$OMP_NUM_THREADS`` when set, else one thread
    per usable core. Inter-op parallelism is 1: the runner calls the model from one thread,
    and a second pool would only compete with the first for the same cores.
    """
    if requested > 0:
        threads = requested
    elif environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        threads = max(1, int(environ["OMP_NUM_THREADS"]))
    else:
        threads = usable_cores()
    torch.set_num_threads(threads)
    # Only settable before the first parallel work: a second backend in one process keeps it.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    return threads
