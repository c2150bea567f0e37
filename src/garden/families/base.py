"""What a model family is: the roles its tensors play, its revision names, its modules for the evaluation
stages (the base class every family module subclasses), and the registry families join."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import ClassVar

import torch

from garden.errors import GardenError
from garden.registry import Registry

#: Every role a `layer=` config may name; each family maps all of them (block roles take an index).
ROLES = ("unembedding", "embedding", "attn_qkv", "attn_q", "attn_k", "attn_v", "attn_out", "mlp_in",
         "mlp_out")  # fmt: skip
BLOCK_ROLES = frozenset(ROLES) - {"unembedding", "embedding"}


@dataclass(frozen=True)
class TensorSpec:
    """What a role resolves to: one stored tensor, or one derived from stored tensors (a slice of a
    fused tensor, or separate tensors joined). `name` is what runs, caches and tables know it by; it is
    the stored name itself whenever nothing is derived, so such caches are those of `layer.tensor`."""

    name: str
    parts: tuple[str, ...]
    derive: Callable[[list[torch.Tensor]], torch.Tensor] | None = None
    #: Says how `derive` combines the parts (in the name and the cache key of derived tensors).
    how: str = ""

    @staticmethod
    def stored(name: str) -> TensorSpec:
        return TensorSpec(name, (name,))

    @property
    def derived(self) -> bool:
        return self.derive is not None


@dataclass(frozen=True)
class Revision:
    """A checkpoint's name parsed: its training step, and the tokens seen where the name says."""

    name: str
    step: int
    tokens: int | None = None


class Family:
    """One architecture's naming. Subclasses set the class attributes and the model-level hooks."""

    name: ClassVar[str]
    #: config.json `model_type` values of this family (how `model=local` detects it).
    model_types: ClassVar[tuple[str, ...]]
    #: Checkpoint names (Hub branches, step folders): a regex with groups `step` and, optionally,
    #: `tokens` (in billions). A model config may narrow it with `model.revision_pattern`.
    revision_pattern: ClassVar[str]
    #: Role -> stored tensor name ({index} = block), for the roles stored as one tensor.
    stored_roles: ClassVar[dict[str, str]]

    @property
    def markers(self) -> set[str]:
        """Its roles' tensor names (block 0): how a series without config.json is recognised."""
        return {pattern.format(index=0) for pattern in self.stored_roles.values()}

    def tensor(self, role: str, index: int | None, config: dict) -> TensorSpec:
        """The tensor of `role` (in block `index`): stored, or derived by `derived_role`."""
        if role in self.stored_roles:
            return TensorSpec.stored(self.stored_roles[role].format(index=index))
        return self.derived_role(role, index, config)

    def derived_role(self, role: str, index: int | None, config: dict) -> TensorSpec:
        raise GardenError(f"family {self.name} has no tensor for role {role!r}")

    # Model-level hooks (the evaluation stages), on a loaded `transformers` model: module paths, so a
    # family names its modules and the base class does the rest.
    #: The list of transformer blocks, from the model.
    blocks_path: ClassVar[str]
    #: From a block: the module whose output CKA compares as the attention output (the output projection).
    attention_output_path: ClassVar[str]
    #: From a block: the MLP's output projection (CKA's MLP output; PER of its weight).
    mlp_output_path: ClassVar[str]
    #: From a block: the attention output projection's weight (d x heads*head_dim).
    attention_output_weight_path: ClassVar[str]

    def blocks(self, model) -> list:
        return list(attrgetter(self.blocks_path)(model))

    def attention_output(self, block) -> torch.nn.Module:
        return attrgetter(self.attention_output_path)(block)

    def mlp_output(self, block) -> torch.nn.Module:
        return attrgetter(self.mlp_output_path)(block)

    def value_weight(self, block, config) -> torch.Tensor:
        """W_V of every key/value head, stacked: (kv_heads * head_dim) x d."""
        raise NotImplementedError

    def ov_circuits(self, block, config) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(W_O[:, h], W_V of head h's key/value group) for every query head h; with grouped-query
        attention query head h reads group h // (heads / kv_heads)."""
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        w_o = attrgetter(self.attention_output_weight_path)(block).detach().cpu()
        w_v = self.value_weight(block, config).detach().cpu()
        head_dim, group = w_o.shape[1] // heads, heads // kv_heads

        def rows(i: int) -> slice:
            return slice(i * head_dim, (i + 1) * head_dim)

        return [(w_o[:, rows(h)], w_v[rows(h // group)]) for h in range(heads)]

    def parameter_count(self, architecture: dict) -> float | None:
        raise NotImplementedError

    def parse_revision(self, name: str, pattern: str | None = None) -> Revision | None:
        match = re.fullmatch(pattern or self.revision_pattern, name)
        if match is None:
            return None
        tokens = match.groupdict().get("tokens")
        return Revision(name, int(match.group("step")), None if tokens is None else int(tokens) * 10**9)


FAMILIES: Registry[Family] = Registry("family", "model.family")


def register(cls: type[Family]) -> type[Family]:
    """Register a Family subclass (one instance) under its `name`."""
    FAMILIES[cls.name] = cls()
    return cls
