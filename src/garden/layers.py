"""Map a conf/layer/ entry (a role, valid for every model family, or any exact name) to a tensor."""

from __future__ import annotations

from dataclasses import dataclass

from garden.errors import GardenError
from garden.families import BLOCK_ROLES, Family, TensorSpec, require
from garden.settings import LayerSettings


@dataclass(frozen=True)
class ResolvedLayer:
    spec: TensorSpec  # the stored tensor, or the stored tensors it is derived from
    label: str  # what run names show: unembedding, mlp_out.3, or the exact tensor name

    @property
    def tensor(self) -> str:
        """The name runs, caches and tables know the tensor by (the stored name when not derived)."""
        return self.spec.name


def needs_index(layer: LayerSettings) -> bool:
    return not layer.tensor and layer.role in BLOCK_ROLES


def resolve_layer(
    layer: LayerSettings, family: Family | None, num_layers: int | None, config: dict | None = None
) -> ResolvedLayer:
    """Resolve `layer.tensor`, or `layer.role` in `family` with `layer.index` checked against the block
    count; `config` (config.json or model.architecture) gives what derived roles need (head counts)."""
    if layer.tensor:
        return ResolvedLayer(TensorSpec.stored(layer.tensor), layer.tensor)
    role = str(layer.role)
    family = require(family, f"layer={layer.name}")
    if not needs_index(layer):
        return ResolvedLayer(family.tensor(role, None, config or {}), layer.name)
    index = layer.index
    if index is None:
        raise GardenError(f"layer={layer.name} is a block tensor; it needs layer.index=<block>")
    if num_layers is None:
        raise GardenError(f"layer={layer.name} is a block tensor, but the number of blocks is unknown")
    if not -num_layers <= index < num_layers:
        raise GardenError(
            f"layer.index={index} is out of range: the model has {num_layers} blocks, "
            f"valid layer.index is 0..{num_layers - 1} (or -{num_layers}..-1 from the end)"
        )
    index %= num_layers
    return ResolvedLayer(family.tensor(role, index, config or {}), f"{layer.name}.{index}")
