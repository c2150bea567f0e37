"""Model families: what differs between checkpoint suites, one small registered module each.

A family says which tensor plays each role (`unembedding`, `attn_v`, `mlp_out`, ... per block), how a
checkpoint's revision or folder name maps to its training step (and tokens, where the name has them),
which modules the CKA hooks read, each head's OV circuit (GQA-aware) and the parameter count `compare`
plots against. The core never names a tensor of one architecture: it asks the family.

A new family is one module here (a `Family` subclass decorated with `@register`, imported below) and its
model configs under conf/model/ (`family: <name>`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from operator import attrgetter
from typing import ClassVar

import torch

from garden.errors import GardenError

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


FAMILIES: dict[str, Family] = {}


def register(cls: type[Family]) -> type[Family]:
    FAMILIES[cls.name] = cls()
    return cls


def get(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise GardenError(
            f"model.family={name!r} is not a known family; valid: {', '.join(FAMILIES)}"
        ) from None


def configured(model_cfg) -> Family | None:
    """The family `model.family` names; None where it names none (the series then tells, `detect`)."""
    name = model_cfg.get("family")
    return None if name is None else get(str(name))


def detect(config: dict | None, tensor_names: Callable[[], Iterable[str]]) -> Family | None:
    """The family of a series on disk: config.json's `model_type`, else the one family whose role tensors
    it holds; None when neither tells (fine for `layer.tensor=<exact name>`; see `require`)."""
    model_type = (config or {}).get("model_type")
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    names = set(tensor_names())
    matching = [family for family in FAMILIES.values() if family.markers & names]
    return matching[0] if len(matching) == 1 else None


def require(family: Family | None, what: str) -> Family:
    """The family, or an error saying that `what` needs one and how to name it."""
    if family is not None:
        return family
    known = ", ".join(f"{f.name} (model_type {'/'.join(f.model_types)})" for f in FAMILIES.values())
    raise GardenError(
        f"{what} needs the model family, and neither config.json's model_type nor the tensor names tell it; "
        f"set model.family to one of: {known}"
    )


def parse_revisions(
    names: Iterable[str], family: Family | None, pattern: str | None, where: str
) -> dict[int, Revision]:
    """{step: revision} of the names that are checkpoints (of `family`, or of any family when it is not
    known yet); two names for one step are an error naming both (narrow it with model.revision_pattern)."""
    candidates = [family] if family is not None else list(FAMILIES.values())
    found: dict[int, Revision] = {}
    for name in sorted(names):
        revision = next((r for f in candidates if (r := f.parse_revision(name, pattern))), None)
        if revision is None:
            continue
        if revision.step in found:
            raise GardenError(
                f"{where}: {found[revision.step].name!r} and {name!r} are both step {revision.step}; "
                "set model.revision_pattern to the one series to analyse"
            )
        found[revision.step] = revision
    return dict(sorted(found.items()))


from garden.families import gpt_neox, olmo2  # noqa: E402,F401  (registers the families)
