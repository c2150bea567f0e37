"""GPT-NeoX (the Pythia suite, garden's tiny series): `step{N}` branches, a fused per-head qkv."""

from __future__ import annotations

from typing import ClassVar

import torch

from garden.errors import GardenError
from garden.families.base import Family, TensorSpec, register

QKV = "gpt_neox.layers.{index}.attention.query_key_value.weight"
WHICH = {"attn_q": 0, "attn_k": 1, "attn_v": 2}


def _heads(config: dict) -> int:
    heads = config.get("num_attention_heads")
    if not isinstance(heads, int):
        raise GardenError("GPT-NeoX q/k/v roles need num_attention_heads (config.json or model.architecture)")
    return heads


def qkv_rows(fused: torch.Tensor, n_heads: int, which: int) -> torch.Tensor:
    """The q (0), k (1) or v (2) rows of a fused qkv weight or bias: GPT-NeoX interleaves them per head,
    [q_h | k_h | v_h] for each head h, so the rows of one kind are every third head_dim block."""
    per_head = fused.reshape(n_heads, 3, -1, *fused.shape[1:])
    return per_head[:, which].reshape(-1, *fused.shape[1:])


@register
class GPTNeoX(Family):
    name = "gpt_neox"
    model_types = ("gpt_neox",)
    revision_pattern = r"step(?P<step>\d+)"
    stored_roles: ClassVar[dict[str, str]] = {
        "unembedding": "embed_out.weight",
        "embedding": "gpt_neox.embed_in.weight",
        "attn_qkv": QKV,
        "attn_out": "gpt_neox.layers.{index}.attention.dense.weight",
        "mlp_in": "gpt_neox.layers.{index}.mlp.dense_h_to_4h.weight",
        "mlp_out": "gpt_neox.layers.{index}.mlp.dense_4h_to_h.weight",
    }

    blocks_path = "gpt_neox.layers"
    attention_output_path = "attention.dense"
    attention_output_weight_path = "attention.dense.weight"
    mlp_output_path = "mlp.dense_4h_to_h"

    def derived_role(self, role: str, index: int | None, config: dict) -> TensorSpec:
        if role not in WHICH:
            return super().derived_role(role, index, config)
        fused, heads, which = QKV.format(index=index), _heads(config), WHICH[role]
        return TensorSpec(f"{fused}[{role[-1]}]", (fused,), lambda parts: qkv_rows(parts[0], heads, which),
                          how=f"rows {role[-1]} of {heads} interleaved heads")  # fmt: skip

    def value_weight(self, block, config) -> torch.Tensor:
        return qkv_rows(block.attention.query_key_value.weight, config.num_attention_heads, 2)

    def parameter_count(self, architecture: dict) -> float | None:
        """12·L·d² (blocks) + 2·V·d (embedding and unembedding): the count Pythia's names round
        (70m: 70.4M, 160m: 162M, 1.4b: 1.41B)."""
        layers, width, vocab = (
            architecture.get(k) for k in ("num_hidden_layers", "hidden_size", "vocab_size")
        )
        if None in (layers, width, vocab):
            return None
        return float(12 * int(layers) * int(width) ** 2 + 2 * int(vocab) * int(width))
