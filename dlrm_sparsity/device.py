"""Which device to run on, and the environment columns every measured figure carries."""

from __future__ import annotations

import os
import platform

import torch

from dlrm_sparsity.errors import UserInputError

DEVICES = ("cpu", "cuda")


def resolve_device(name: str | None) -> torch.device:
    """cuda when available (cuda:LOCAL_RANK under torchrun), else the CPU."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError("--device cuda: no CUDA device is available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def environment(device: torch.device) -> dict:
    """What makes a figure reproducible: where and with what it was measured."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {"device": f"{device.type}:{name or platform.machine()}",
            "torch_version": torch.__version__, "num_threads": torch.get_num_threads()}
