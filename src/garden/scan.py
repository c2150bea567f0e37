"""What a whole-model scan reads (issue 24, first slice): the tensors that roles, blocks and globs select
from a checkpoint's tensor names, each with its role and block, checked before anything is read.

By default a scan takes every stored role of the family (a derived role, such as GPT-NeoX's q/k/v rows of
the fused qkv, would read the same bytes twice) in every block; `roles` names others, `blocks` narrows the
blocks (a glob's tensors in blocks too; tensors outside the blocks, such as the embeddings and the final
norm, go with block 0, so that shards splitting the blocks split the tensors), `include` adds tensors by
glob (biases, norms) and `exclude` drops them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase

import numpy as np
import pandas as pd

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
    outside_too = 0 in blocks  # the tensors outside the blocks go with block 0's shard
    outside = [b for b in blocks if not 0 <= b < num_layers]
    if outside:
        raise GardenError(f"scan.blocks {outside} are out of range: the model has {num_layers} blocks, valid "
                          f"0..{num_layers - 1}")  # fmt: skip
    chosen: list[ScanTensor] = []
    for role in default_roles(family) if roles is None else roles:
        for block in blocks if role in BLOCK_ROLES else ([None] if outside_too else []):
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
        if (block is None and outside_too) or block in blocks:  # a glob's tensors follow scan.blocks too
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


def block_list(blocks: tuple[int, ...] | str | None, num_layers: int) -> list[int] | None:
    """`scan.blocks` as block indices: None (all), a list as given, `start:stop` as Python's range
    (either end left out: from 0, to the last block)."""
    if blocks is None or not isinstance(blocks, str):
        return None if blocks is None else list(blocks)
    start, stop = blocks.split(":")
    chosen = list(range(int(start or 0), int(stop) if stop else num_layers))
    if not chosen:
        raise GardenError(f"scan.blocks={blocks} selects no block; the model has {num_layers} blocks "
                          f"(0:{num_layers})")  # fmt: skip
    return chosen


def tensor_label(role: object, block: object, name: str) -> str:
    """`mlp_out[3]` for a role's tensor in a block, the role for one outside the blocks, else the name."""
    if isinstance(role, str) and role:
        return role if block is None or pd.isna(block) else f"{role}[{int(block)}]"
    return name


def aggregates(summary: pd.DataFrame) -> dict[str, float]:
    """The few numbers a scan logs to MLflow (NaN where undefined): how many tensors fork and settle, the
    earliest fork, each role's median fork and stationary steps and its earliest-forking block, and where
    the unembedding's fork falls among the others'."""
    fork = _column(summary, "unit_bifurcation_step")
    settle = _column(summary, "stationary_step")
    pooled = _column(summary, "bifurcation_step")
    values = {
        "scan_tensors": float(len(summary)),
        "scan_fork_share": float(fork.notna().mean()) if len(summary) else np.nan,
        "scan_pooled_fork_share": float(pooled.notna().mean()) if len(summary) else np.nan,
        "scan_stationary_share": float(settle.notna().mean()) if len(summary) else np.nan,
        "scan_earliest_fork_step": _stat(fork, "min"),
        "scan_median_fork_step": _stat(fork, "median"),
        "scan_median_stationary_step": _stat(settle, "median"),
    }
    roles = summary["role"].fillna("other") if "role" in summary else pd.Series(["other"] * len(summary))
    for role in dict.fromkeys(roles):
        mine = roles == role
        values[f"scan_{role}_median_fork_step"] = _stat(fork[mine], "median")
        values[f"scan_{role}_median_stationary_step"] = _stat(settle[mine], "median")
        if role in BLOCK_ROLES and fork[mine].notna().any():
            values[f"scan_{role}_earliest_fork_block"] = float(summary.loc[fork[mine].idxmin(), "block"])
    if (roles == "unembedding").any():
        own = fork[roles == "unembedding"].iloc[0]
        others = fork[(roles != "unembedding") & fork.notna()]
        values["scan_unembedding_fork_step"] = float(own) if pd.notna(own) else np.nan
        values["scan_unembedding_forks_after_share"] = (
            float((others < own).mean()) if pd.notna(own) and len(others) else np.nan
        )
    return values


def forks_in_order(summary: pd.DataFrame) -> list[tuple[str, float]]:
    """(label, unit bifurcation step) of each tensor that forks, the earliest first (ties in table order)."""
    fork = _column(summary, "unit_bifurcation_step")
    return [(tensor_label(summary.at[i, "role"], summary.at[i, "block"], summary.at[i, "tensor"]), fork[i])
            for i in fork.dropna().sort_values(kind="stable").index]  # fmt: skip


def stationary_count(summary: pd.DataFrame) -> int:
    """How many tensors become stationary."""
    return int(_column(summary, "stationary_step").notna().sum())


def scan_sentence(summary: pd.DataFrame) -> str:
    """The scan's result in one sentence (its run description's first line): how many tensors fork, which
    first, and how many settle."""
    count, forks = len(summary), forks_in_order(summary)
    if forks:
        label, step = forks[0]
        first = f"{len(forks)} of {count} tensors fork, first {label} at step {step:g}"
    else:
        first = f"none of {count} tensors forks"
    return f"{first[0].upper()}{first[1:]}; {stationary_count(summary)} of {count} become stationary."


def fork_rows(summary: pd.DataFrame, values: dict[str, float], first: int = 3) -> list[tuple[str, str]]:
    """(what, value) rows: the tensors that fork first, each role's median fork step, and the
    unembedding among the others."""
    forks = forks_in_order(summary)
    if not forks:
        return [("forks first", "no tensor forks (no unit bifurcation)")]
    rows = [("forks first", ", ".join(f"{label} (step {step:g})" for label, step in forks[:first]))]
    medians = [(key.removeprefix("scan_").removesuffix("_median_fork_step"), value)
               for key, value in values.items()
               if key.endswith("_median_fork_step") and key != "scan_median_fork_step"]  # fmt: skip
    shown = ", ".join(f"{role} {value:g}" if np.isfinite(value) else f"{role} none"
                      for role, value in medians)  # fmt: skip
    rows.append(("median fork step", shown))
    own = values.get("scan_unembedding_fork_step")
    if own is not None:
        after = values.get("scan_unembedding_forks_after_share", np.nan)
        if not np.isfinite(own):
            rows.append(("unembedding", "does not fork"))
        elif not np.isfinite(after):
            rows.append(("unembedding", f"forks at step {own:g}, the only tensor that forks"))
        else:
            rows.append(("unembedding", f"forks at step {own:g}, after {after:.0%} of the other tensors that "
                                        "fork"))  # fmt: skip
    return rows


def _column(summary: pd.DataFrame, name: str) -> pd.Series:
    if name not in summary:
        return pd.Series([np.nan] * len(summary), index=summary.index, dtype=float)
    return pd.to_numeric(summary[name], errors="coerce").astype(float)


def _stat(values: pd.Series, how: str) -> float:
    present = values.dropna()
    return float(getattr(present, how)()) if len(present) else np.nan
