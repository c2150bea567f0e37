"""Map a conf/layer/ entry (a role, valid for every model family, or any exact name) to a tensor."""

from __future__ import annotations

from dataclasses import dataclass

from garden.errors import GardenError
from garden.families import BLOCK_ROLES, ROLES, Family, TensorSpec, require


@dataclass(frozen=True)
class ResolvedLayer:
    spec: TensorSpec  # the stored tensor, or the stored tensors it is derived from
    label: str  # what run names show: unembedding, mlp_out.3, or the exact tensor name

    @property
    def tensor(self) -> str:
        """The name runs, caches and tables know the tensor by (the stored name when not derived)."""
        return self.spec.name


def needs_index(layer_cfg) -> bool:
    return not layer_cfg.get("tensor") and layer_cfg.get("role") in BLOCK_ROLES


def check_role(layer_cfg) -> None:
    """Before any work: the role is one every family maps."""
    if layer_cfg.get("tensor"):
        return
    role = layer_cfg.get("role")
    if role not in ROLES:
        raise GardenError(f"layer.role={role!r} is not valid; valid: {', '.join(ROLES)} "
                          "(or layer.tensor=<exact tensor name>)")  # fmt: skip


def resolve_layer(
    layer_cfg, family: Family | None, num_layers: int | None, config: dict | None = None
) -> ResolvedLayer:
    """Resolve `layer.tensor`, or `layer.role` in `family` with `layer.index` checked against the block
    count; `config` (config.json or model.architecture) gives what derived roles need (head counts)."""
    exact = layer_cfg.get("tensor")
    if exact:
        return ResolvedLayer(TensorSpec.stored(str(exact)), str(exact))
    check_role(layer_cfg)
    role = str(layer_cfg.role)
    family = require(family, f"layer={layer_cfg.name}")
    if not needs_index(layer_cfg):
        return ResolvedLayer(family.tensor(role, None, config or {}), str(layer_cfg.name))
    index = layer_cfg.get("index")
    if not isinstance(index, int) or isinstance(index, bool):
        raise GardenError(f"layer={layer_cfg.name} needs an integer layer.index, got {index!r}")
    if num_layers is None:
        raise GardenError(f"layer={layer_cfg.name} is a block tensor, but the number of blocks is unknown")
    if not -num_layers <= index < num_layers:
        raise GardenError(
            f"layer.index={index} is out of range: the model has {num_layers} blocks, "
            f"valid layer.index is 0..{num_layers - 1} (or -{num_layers}..-1 from the end)"
        )
    index %= num_layers
    return ResolvedLayer(family.tensor(role, index, config or {}), f"{layer_cfg.name}.{index}")
