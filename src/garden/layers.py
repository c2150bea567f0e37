"""Map a conf/layer/ entry (a named tensor of a GPT-NeoX block, or any exact name) to a tensor name."""

from __future__ import annotations

from dataclasses import dataclass

from garden.errors import GardenError


@dataclass(frozen=True)
class ResolvedLayer:
    tensor: str  # exact name on disk
    label: str  # what run names show: unembedding, mlp_out.3, or the exact tensor name


def needs_index(layer_cfg) -> bool:
    return not layer_cfg.get("tensor") and "{index}" in str(layer_cfg.get("pattern", ""))


def resolve_layer(layer_cfg, num_layers: int | None) -> ResolvedLayer:
    """Resolve `layer.tensor`, or `layer.pattern` with `layer.index` checked against the block count."""
    exact = layer_cfg.get("tensor")
    if exact:
        return ResolvedLayer(str(exact), str(exact))
    pattern = str(layer_cfg.get("pattern") or "")
    if not pattern:
        raise GardenError("the layer config needs layer.pattern or layer.tensor=<exact tensor name>")
    if not needs_index(layer_cfg):
        return ResolvedLayer(pattern, str(layer_cfg.name))
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
    return ResolvedLayer(pattern.format(index=index), f"{layer_cfg.name}.{index}")
