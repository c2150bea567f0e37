"""The evaluation stages, registered by name (`evaluation.stages`): each scores one loaded checkpoint.

`perplexity` (held-out token perplexity), `lambada` (last-word log-likelihood and accuracy), `stability`
(PER of each MLP output weight and each head's OV circuit, and linear CKA of every layer's attention and
MLP output against the final checkpoint on a fixed batch, last token only). A stage is a function of the
model, the plan, the fixed inputs and (for stability) the family and the activations; its record's keys
are the evaluation table's columns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from garden.evaluation import stability
from garden.evaluation.perplexity import lambada_scores, token_perplexity
from garden.families import Family
from garden.registry import Registry

Activations = dict[str, list[torch.Tensor]]


@dataclass(frozen=True)
class ScoringInputs:
    """What every checkpoint is scored on: token windows, LAMBADA examples, the CKA batch (with the
    final checkpoint's activations on it, `reference`, once known)."""

    windows: torch.Tensor
    examples: list
    batch: torch.Tensor | None
    pad_id: int
    batch_size: int


@dataclass(frozen=True)
class Checkpoint:
    """One loaded checkpoint as the stages see it: the model, its family, its activations on the CKA
    batch and the final checkpoint's (None without the stability stage)."""

    model: torch.nn.Module
    family: Family | None = None
    acts: Activations | None = None
    reference: Activations | None = None


Stage = Callable[[Checkpoint, ScoringInputs], dict]
STAGES: Registry[Stage] = Registry("evaluation stage", "evaluation.stages")


@STAGES.register("perplexity")
def perplexity_stage(checkpoint: Checkpoint, inputs: ScoringInputs) -> dict:
    return {"perplexity": token_perplexity(checkpoint.model, inputs.windows, inputs.batch_size)}


@STAGES.register("lambada")
def lambada_stage(checkpoint: Checkpoint, inputs: ScoringInputs) -> dict:
    return lambada_scores(checkpoint.model, inputs.examples, inputs.batch_size, inputs.pad_id)


@STAGES.register("stability")
def stability_stage(checkpoint: Checkpoint, inputs: ScoringInputs) -> dict:
    record = weight_ranks(checkpoint.model, checkpoint.family)
    for kind, per_layer in checkpoint.acts.items():
        for layer, matrix in enumerate(per_layer):
            record[f"cka_{kind}.{layer}"] = stability.linear_cka(matrix, checkpoint.reference[kind][layer])
    return record


def score_checkpoint(checkpoint: Checkpoint, stages: tuple[str, ...], inputs: ScoringInputs) -> dict:
    """One checkpoint's evaluation record: each stage's scores, and the model's shape."""
    config = checkpoint.model.config
    record: dict = {"n_layers": config.num_hidden_layers, "n_heads": config.num_attention_heads}
    for stage in stages:
        record.update(STAGES[stage](checkpoint, inputs))
    return record


def weight_ranks(model, family: Family) -> dict[str, float]:
    """PER and condition number of each block's MLP output weight; PER of each head's OV circuit (each
    query head with its key/value group's W_V, as the family gives them)."""
    out: dict[str, float] = {}
    for i, block in enumerate(family.blocks(model)):
        s = torch.linalg.svdvals(family.mlp_output(block).weight.detach().double().cpu())
        out[f"per_mlp.{i}"] = stability.proportional_effective_rank(s)
        out[f"cond_mlp.{i}"] = stability.condition_number(s)
        heads = stability.ov_singular_values(family.ov_circuits(block, model.config))
        values = [stability.proportional_effective_rank(s_h) for s_h in heads]
        for h, value in enumerate(values):
            out[f"per_ov.{i}.{h}"] = value
        out[f"per_ov.{i}"] = float(np.mean(values))
        out[f"cond_ov.{i}"] = float(np.median([stability.condition_number(s_h) for s_h in heads]))
    return out


@torch.inference_mode()
def activations(model, batch: torch.Tensor, batch_size: int, family: Family) -> dict[str, list[torch.Tensor]]:
    """Last-token outputs of every block's attention output projection and MLP output projection."""
    device = next(model.parameters()).device
    captured: dict[str, list[list[torch.Tensor]]] = {"attn": [], "mlp": []}
    hooks = []
    for block in family.blocks(model):
        for kind, module in (("attn", family.attention_output(block)), ("mlp", family.mlp_output(block))):
            store: list[torch.Tensor] = []
            captured[kind].append(store)
            hooks.append(
                module.register_forward_hook(lambda _m, _i, out, s=store: s.append(out[:, -1].float().cpu()))
            )
    try:
        for start in range(0, len(batch), batch_size):
            model(input_ids=batch[start : start + batch_size].to(device))
    finally:
        for hook in hooks:
            hook.remove()
    return {kind: [torch.cat(parts) for parts in layers] for kind, layers in captured.items()}
