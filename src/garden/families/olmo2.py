"""OLMo-2 (allenai): Llama-like names, separate q/k/v (grouped-query attention in some sizes), branches
`stage1-step{N}-tokens{M}B` (some published without `stage1-`; `stage2-` ingredients are separate
continuations and are not matched unless model.revision_pattern says so)."""

from __future__ import annotations

from typing import ClassVar

import torch

from garden.families.base import Family, TensorSpec, register

PROJ = "model.layers.{index}.self_attn.{which}_proj.weight"


@register
class Olmo2(Family):
    name = "olmo2"
    model_types = ("olmo2",)
    revision_pattern = r"(?:stage1-)?step(?P<step>\d+)-tokens(?P<tokens>\d+)B"
    stored_roles: ClassVar[dict[str, str]] = {
        "unembedding": "lm_head.weight",
        "embedding": "model.embed_tokens.weight",
        "attn_q": PROJ.replace("{which}", "q"),
        "attn_k": PROJ.replace("{which}", "k"),
        "attn_v": PROJ.replace("{which}", "v"),
        "attn_out": PROJ.replace("{which}", "o"),
        "mlp_in": "model.layers.{index}.mlp.up_proj.weight",
        "mlp_out": "model.layers.{index}.mlp.down_proj.weight",
    }

    blocks_path = "model.layers"
    attention_output_path = "self_attn.o_proj"
    attention_output_weight_path = "self_attn.o_proj.weight"
    mlp_output_path = "mlp.down_proj"

    def derived_role(self, role: str, index: int | None, config: dict) -> TensorSpec:
        if role != "attn_qkv":
            return super().derived_role(role, index, config)
        parts = tuple(PROJ.format(index=index, which=w) for w in "qkv")
        return TensorSpec(f"model.layers.{index}.self_attn.qkv_proj.weight", parts, torch.cat,
                          how="q, k, v rows joined")  # fmt: skip

    def value_weight(self, block, config) -> torch.Tensor:
        return block.self_attn.v_proj.weight

    def parameter_count(self, architecture: dict) -> float | None:
        """Per block q and o (d·d each), k and v (d·d·kv/heads each), the SwiGLU MLP (3·d·I), plus the
        untied embedding and unembedding (2·V·d); norms left out (O(d))."""
        keys = ("num_hidden_layers", "hidden_size", "vocab_size", "intermediate_size", "num_attention_heads")
        layers, width, vocab, inner, heads = (architecture.get(k) for k in keys)
        if None in (layers, width, vocab, inner, heads):
            return None
        kv = int(architecture.get("num_key_value_heads") or heads)
        width = int(width)
        attention = 2 * width**2 + 2 * width * width * kv // int(heads)
        return float(int(layers) * (attention + 3 * width * int(inner)) + 2 * int(vocab) * width)
