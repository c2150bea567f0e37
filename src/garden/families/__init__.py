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

from garden.errors import GardenError
from garden.families import gpt_neox, olmo2  # noqa: F401  (they register the families)
from garden.families.base import BLOCK_ROLES, FAMILIES, ROLES, Family, Revision, TensorSpec, register

__all__ = ["BLOCK_ROLES", "FAMILIES", "ROLES", "Family", "Revision", "TensorSpec", "detect",
           "get", "parse_revisions", "register", "require"]  # fmt: skip


def get(name: str) -> Family:
    return FAMILIES.resolve(name)


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


#: The folders a Hugging Face `Trainer` saves in its `output_dir`, whatever the model: `checkpoint-{N}`, N the
#: optimizer step (`TrainerState.global_step`).
TRAINER_CHECKPOINT = re.compile(r"checkpoint-(?P<step>\d+)")


def parse_revisions(
    names: Iterable[str],
    family: Family | None,
    pattern: str | None,
    where: str,
    trainer_folders: bool = False,
) -> dict[int, Revision]:
    """{step: revision} of the names that are checkpoints (of `family`, or of any family when it is not
    known yet; with `trainer_folders` and no `pattern`, also a `Trainer`'s `checkpoint-{N}` folders); two
    names for one step are an error naming both (narrow it with model.revision_pattern)."""
    candidates = [family] if family is not None else list(FAMILIES.values())

    def parse(name: str) -> Revision | None:
        if trainer_folders and pattern is None and (match := TRAINER_CHECKPOINT.fullmatch(name)):
            return Revision(name, int(match.group("step")), None)
        return next((r for f in candidates if (r := f.parse_revision(name, pattern))), None)

    found: dict[int, Revision] = {}
    for name in sorted(names):
        revision = parse(name)
        if revision is None:
            continue
        if revision.step in found:
            raise GardenError(
                f"{where}: {found[revision.step].name!r} and {name!r} are both step {revision.step}; "
                "set model.revision_pattern to the one series to analyse"
            )
        found[revision.step] = revision
    return dict(sorted(found.items()))


