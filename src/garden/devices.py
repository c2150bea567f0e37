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


@contextmanager
def pass_threads(device: torch.device) -> Iterator[None]:
    """torch's intra-op threads for the statistics pass, the offline extraction's and the live monitor's
    alike (float32 block sums are split by thread count: the same count gives the same last bits). On the
    CPU the sums, the histogram helper and the dip worker run at once: those two get a core each rather
    than let torch's threads oversubscribe the machine."""
    if device.type != "cpu":
        yield
        return
    with pinned_threads(max(1, torch.get_num_threads() - 2)):
        yield
