"""Opt-in int8 vision encoder on CPU: dynamic quantization of SigLIP's and the connector's Linears.

Each ``nn.Linear`` of the vision tower (q/k/v/out projections, MLP) and of the connector gets
int8 weights, per output channel, and quantizes its input on the fly, per call
(``torch.ao.quantization.quantize_dynamic``, fbgemm/oneDNN int8 GEMMs). The patch embedding
(a convolution), the layer norms, attention's own matmuls and the whole text model stay as they
are. Measured with ``bench/vision.py``: see the README ("Faster vision on CPU").

Why ``torch.ao``: it is deprecated in torch 2.13 (torchao is the named successor) but it is the
one int8 path with fast CPU kernels in eager mode here; torchao's int8 dynamic config ran at
~4 GOP/s eager on CPU (it needs ``torch.compile``). A torch without it is a one-line error.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from types import ModuleType

import torch

from streamd.errors import ModelError
from streamd.scoring.local_config import VISION_QUANTIZE
from streamd.scoring.transformers_checkpoint import Checkpoint

logger = logging.getLogger(__name__)


def apply_vision_quantize(checkpoint: Checkpoint, mode: str) -> int:
    """Quantize ``checkpoint``'s vision tower and connector in place; returns the layers changed.

    Called once, right after loading and before any frame is encoded. ``none`` changes nothing.
    int8 needs the model in float32 on the CPU (the int8 kernels are CPU-only and take float32
    activations); anything else is a ``ModelError`` naming the fix.
    """
    if mode == "none":
        return 0
    if mode != "int8":
        raise ModelError(f"model.vision_quantize must be one of {', '.join(VISION_QUANTIZE)}")
    dtype = str(checkpoint.dtype).removeprefix("torch.")
    if checkpoint.device.type != "cpu" or checkpoint.dtype != torch.float32:
        raise ModelError(
            f"model.vision_quantize int8 runs on the CPU in float32, and this model is on"
            f" {checkpoint.device} in {dtype}: set model.device to cpu and model.dtype to"
            " float32, or model.vision_quantize to none"
        )
    inner = checkpoint.model.model
    count = 0
    for part in (inner.vision_model, inner.connector):
        count += quantize_linears(part)
    logger.info("vision encoder: int8 dynamic quantization of %d linear layers", count)
    return count


def quantize_linears(module: torch.nn.Module, *, per_channel: bool = True) -> int:
    """Replace every ``nn.Linear`` under ``module`` with its dynamic int8 twin, in place.

    ``per_channel``: one weight scale per output channel (the default, closer to float32 at
    the same speed) rather than one per layer.
    """
    linears = sum(isinstance(child, torch.nn.Linear) for child in module.modules())
    with warnings.catch_warnings():
        # torch 2.13 warns on import and at every call that torch.ao.quantization is deprecated.
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*deprecated")
        quantize_dynamic, qconfigs = _torch_ao()
        config = (
            qconfigs.per_channel_dynamic_qconfig
            if per_channel
            else qconfigs.default_dynamic_qconfig
        )
        quantize_dynamic(module, {torch.nn.Linear: config}, dtype=torch.qint8, inplace=True)
    return linears


def _torch_ao() -> tuple[Callable[..., torch.nn.Module], ModuleType]:
    try:
        from torch.ao import quantization  # noqa: PLC0415 - deprecated: imported only when used
    except ImportError as exc:  # removed by a torch newer than 2.13
        raise ModelError(
            f"model.vision_quantize: int8 needs torch.ao.quantization, which torch"
            f" {torch.__version__} lacks: install torch==2.13.0 or set vision_quantize: none"
        ) from exc
    return quantization.quantize_dynamic, quantization
