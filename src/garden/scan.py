"""What a whole-model scan reads (issue 24, first slice): the tensors that roles, blocks and globs select
from a checkpoint's tensor names, each with its role and block, checked before anything is read.

By default a scan takes every stored role of the family (a derived role, such as GPT-NeoX's q/k/v rows of
the fused qkv, would read the same bytes twice) in every block; `roles` names others, `blocks` narrows the
blocks (a glob's tensors in blocks too; tensors outside the blocks, such as the embeddings and the final
norm, are always taken), `include` adds tensors by glob (biases, norms) and `exclude` drops them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase

from garden.errors import GardenError
from garden.families import BLOCK_ROLES, ROLES, Family, TensorSpec


@dataclass(frozen=True)
class ScanTensor:
    """One selected tensor: its role and block where a role named it (None for a glob's)."""

    spec: TensorSpec
    role: str | None
    block: int | None

    @property
    def name(self) -> str:
        return self.spec.name


def default_roles(family: Family) -> list[str]:
    """The family's stored roles, in the registry's order: each stored tensor read once."""
    return [role for role in ROLES if role in family.stored_roles]


def select_tensors(family: Family, config: dict, names: list[str], num_layers: int,
                   roles: list[str] | None = None, blocks: list[int] | None = None,
                   include: list[str] = (), exclude: list[str] = ()) -> list[ScanTensor]:  # fmt: skip
    """The scan's tensors among `names` (a checkpoint's), in role then block order, then the globs'."""
    available = set(names)
    blocks = list(range(num_layers)) if blocks is None else list(blocks)
    outside = [b for b in blocks if not 0 <= b < num_layers]
    if outside:
        raise GardenError(f"scan.blocks {outside} are out of range: the model has {num_layers} blocks, valid "
                          f"0..{num_layers - 1}")  # fmt: skip
    chosen: list[ScanTensor] = []
    for role in default_roles(family) if roles is None else roles:
        for block in blocks if role in BLOCK_ROLES else [None]:
            spec = family.tensor(role, block, config)
            missing = [part for part in spec.parts if part not in available]
            if missing:
                have = [r for r in ROLES if _has(family, r, config, available)]
                raise GardenError(f"scan.roles: {family.name} names no {role!r} tensor in this series "
                                  f"({missing[0]} is absent); its roles: {', '.join(have)}")  # fmt: skip
            chosen.append(ScanTensor(spec, role, block))
    taken = {t.name for t in chosen} | {part for t in chosen for part in t.spec.parts}
    in_block = re.compile(rf"{re.escape(family.blocks_path)}\.(\d+)\.")
    for name in names:
        if name in taken or not any(fnmatchcase(name, g) for g in include):
            continue
        found = in_block.match(name)
        block = None if found is None else int(found.group(1))
        if block is None or block in blocks:  # a glob's block tensors follow scan.blocks too
            chosen.append(ScanTensor(TensorSpec.stored(name), None, block))
    chosen = [t for t in chosen if not any(fnmatchcase(t.name, g) for g in exclude)]
    if not chosen:
        shown = ", ".join(sorted(names)[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
        raise GardenError(f"the scan selects no tensor (scan.roles, scan.include and scan.exclude); the "
                          f"checkpoints hold: {shown}")  # fmt: skip
    return chosen


def _has(family: Family, role: str, config: dict, available: set[str]) -> bool:
    try:
        spec = family.tensor(role, 0 if role in BLOCK_ROLES else None, config)
    except GardenError:
        return False
    return all(part in available for part in spec.parts)
