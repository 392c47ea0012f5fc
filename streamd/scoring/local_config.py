"""The ``model:`` section of the in-process backends: transformers, mlx, motion (pure)."""

from __future__ import annotations

import re
from typing import Literal, get_args

from pydantic import Field, field_validator

from streamd.sections import DEFAULT_MODEL_ID, Section

DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
LocalBackend = Literal["auto", "transformers", "mlx", "motion"]
Dtype = Literal["auto", "bfloat16", "float16", "float32"]
DTYPES: tuple[str, ...] = get_args(Dtype)


class ModelConfig(Section):
    """Which model scores the windows, and where it runs (in this process)."""

    backend: LocalBackend = Field(
        "auto", description="auto: mlx on Apple Silicon with mlx-vlm installed, else transformers"
    )
    id: str = Field(DEFAULT_MODEL_ID, min_length=1, description="hub id or local directory")
    device: str = Field("auto", description="auto | cuda | cuda:N | mps | cpu")
    dtype: Dtype = Field("auto", description="auto picks from the hardware")
    max_new_tokens: int = Field(64, ge=1, le=1024, description="longest description, in tokens")
    timeout_s: float = Field(
        120.0, gt=0, le=3600, description="one window's analysis longer than this stalls the runner"
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not DEVICE_RE.match(value):
            raise ValueError(f"must be auto, cpu, mps, cuda or cuda:N, not {value!r}")
        return value

    @property
    def stall_timeout_s(self) -> float:
        """A model call longer than this stalls the runner."""
        return self.timeout_s

    def summary(self) -> str:
        """One line for ``check-config``."""
        return f"{self.id} (backend {self.backend}, device {self.device}, dtype {self.dtype})"
