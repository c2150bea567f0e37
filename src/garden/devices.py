"""Which torch device a job runs on: `auto` picks cuda when present, else the CPU."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from garden.errors import GardenError


def resolve_device(name: str) -> torch.device:
    """`auto` picks cuda when present, else the CPU; a cuda device must be present (which names are
    valid is the schema's rule, `garden.settings.rules.DEVICE`)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise GardenError(f"device={name} but no CUDA device is present; use device=auto or device=cpu")
    return torch.device(name)


@contextmanager
def pinned_threads(count: int) -> Iterator[None]:
    """torch's intra-op CPU threads set to `count` for a block, and the process's own count given back
    after it (also when the block fails)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
