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
VisionQuantize = Literal["none", "int8"]
VISION_QUANTIZE: tuple[str, ...] = get_args(VisionQuantize)


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
    threads: int = Field(
        0,
        ge=0,
        le=256,
        description=(
            "torch CPU threads; 0: $OMP_NUM_THREADS, else the cores this process may use."
            " Two instances on one box: split the cores between them"
        ),
    )
    vision_quantize: VisionQuantize = Field(
        "none",
        description=(
            "int8: the vision encoder's linear layers in int8 (transformers on CPU, float32"
            " only), 1.3-1.55x faster vision on an AVX2 CPU; features differ slightly from float32,"
            " so scores may too (bench/vision.py measures both)"
        ),
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
