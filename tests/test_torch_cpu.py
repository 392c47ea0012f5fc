"""torch's CPU thread settings (``model.threads``)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from pydantic import ValidationError

from streamd.config import ModelConfig
from streamd.scoring.torch_cpu import configure_threads, usable_cores


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_requested_threads_are_set() -> None:
    assert configure_threads(1, {}) == 1
    assert torch.get_num_threads() == 1
    assert configure_threads(3, {"OMP_NUM_THREADS": "2"}) == 3  # the config wins


def test_auto_follows_omp_num_threads_then_the_usable_cores() -> None:
    assert configure_threads(0, {"OMP_NUM_THREADS": "1"}) == 1
    assert torch.get_num_threads() == 1
    cores = usable_cores()
    assert cores == len(os.sched_getaffinity(0))
    assert configure_threads(0, {"OMP_NUM_THREADS": "lots"}) == cores
    assert configure_threads(0, {}) == cores
    assert torch.get_num_threads() == cores


def test_threads_in_the_config() -> None:
    assert ModelConfig().threads == 0
    assert ModelConfig(threads=2).threads == 2
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        ModelConfig(threads=-1)
