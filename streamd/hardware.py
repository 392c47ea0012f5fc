"""What CPU this is, for benchmark reports (pure: reads ``/proc/cpuinfo`` text)."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

CPU_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
"""The flags that decide which kernels torch runs (fp32 AVX2/AVX-512, int8 VNNI, bf16 AMX)."""


@dataclass(frozen=True, slots=True)
class Cpu:
    """A CPU as benchmark numbers need it named."""

    model: str
    flags: frozenset[str]
    usable_cores: int

    def flag_list(self) -> str:
        """``avx2=yes avx512f=no ...`` over ``CPU_FLAGS``."""
        return " ".join(f"{flag}={'yes' if flag in self.flags else 'no'}" for flag in CPU_FLAGS)

    def summary(self) -> str:
        """One line: model, usable cores, the flags."""
        return f"{self.model}, {self.usable_cores} usable cores; {self.flag_list()}"


def parse_cpuinfo(text: str, usable_cores: int) -> Cpu:
    """The first processor's model name and flags in ``/proc/cpuinfo`` text."""
    lines = text.splitlines()
    model = next(
        (line.partition(":")[2].strip() for line in lines if line.startswith("model name")),
        platform.processor() or platform.machine(),
    )
    flags = next((line.partition(":")[2].split() for line in lines if line.startswith("flags")), [])
    return Cpu(model, frozenset(flags), usable_cores)


def this_cpu() -> Cpu:
    """This machine's CPU (Linux; elsewhere the model is the platform's name, no flags)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        text = ""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return parse_cpuinfo(text, max(1, cores))
