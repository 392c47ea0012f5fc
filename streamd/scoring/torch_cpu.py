"""The one place that asks torch's private CPU API about the hardware (torch 2.x)."""

from __future__ import annotations

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
