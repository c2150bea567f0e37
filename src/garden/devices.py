"""Which torch device a job runs on: `auto` picks cuda when present, else the CPU."""

from __future__ import annotations

import torch

from garden.errors import GardenError


def resolve_device(name: str) -> torch.device:
    """`auto` picks cuda when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise GardenError(f"device={name} but no CUDA device is present; use device=auto or device=cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise GardenError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N")
    return torch.device(name)
