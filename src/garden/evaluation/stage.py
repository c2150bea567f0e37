"""The evaluation stage: load each selected checkpoint once, run every requested measure on it.

Stages: `perplexity` (held-out token perplexity), `lambada` (last-word log-likelihood and accuracy),
`stability` (PER of each MLP output weight and each head's OV circuit, and linear CKA of every layer's
attention and MLP output against the final checkpoint on a fixed batch, last token only). Each finished
step is cached (one JSON per step, plus the final checkpoint's activations), so reruns and interrupted
runs pick up where they stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from garden.errors import GardenError
from garden.evaluation import data, stability
from garden.evaluation.perplexity import encode_lambada, lambada_scores, token_perplexity, token_windows
from garden.schedule import select_steps
from garden.series import CheckpointSeries

STAGES = ("perplexity", "lambada", "stability")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EvaluationPlan:
    stages: tuple[str, ...]
    steps: tuple[int, ...]
    device: str
    dtype: str
    batch_size: int
    seq_len: int
    max_windows: int | None
    lambada_limit: int | None
    cka_sequences: int
    seed: int

    def cache_key(self, series_identity: str, data_digest: str) -> str:
        fields = asdict(self)
        del fields["steps"], fields["device"], fields["batch_size"]
        fields["final_step"] = self.steps[-1]
        payload = json.dumps({"series": series_identity, "data": data_digest, **fields}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:20]


def plan_evaluation(cfg, available_steps: list[int]) -> EvaluationPlan | None:
    """Validate the `evaluation` config against the series before any model is loaded."""
    ev = cfg.evaluation
    stages = tuple(ev.stages or ())
    if not stages:
        return None
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise GardenError(f"unknown evaluation stage(s) {unknown}; valid: {', '.join(STAGES)}")
    if str(ev.dtype) not in DTYPES:
        raise GardenError(f"evaluation.dtype={ev.dtype!r} is not valid; valid: {', '.join(DTYPES)}")
    for name in ("batch_size", "seq_len", "max_windows"):
        value = ev.get(name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise GardenError(f"evaluation.{name} must be a positive integer, got {value!r}")
    limit = ev.lambada.get("limit")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise GardenError(f"evaluation.lambada.limit must be a positive integer or null, got {limit!r}")
    if "lambada" in stages:
        if ev.lambada.source not in data.LAMBADA_SOURCES:
            raise GardenError(
                f"evaluation.lambada.source={ev.lambada.source!r} is not valid; "
                f"valid: {', '.join(data.LAMBADA_SOURCES)}"
            )
        if ev.lambada.source == "file" and not (ev.lambada.path and Path(str(ev.lambada.path)).is_file()):
            raise GardenError(f"evaluation.lambada.path={ev.lambada.path!r} is not a file (source=file)")
    if ev.text.source not in data.TEXT_SOURCES:
        raise GardenError(
            f"evaluation.text.source={ev.text.source!r} is not valid; valid: {', '.join(data.TEXT_SOURCES)}"
        )
    if ev.text.source == "file" and not ev.text.path:
        raise GardenError("evaluation.text.source=file needs evaluation.text.path")
    if int(ev.cka.n_sequences) < 2:
        raise GardenError(f"evaluation.cka.n_sequences must be at least 2, got {ev.cka.n_sequences}")
    from omegaconf import OmegaConf

    steps = select_steps(available_steps, OmegaConf.to_container(ev.steps, resolve=True))
    from garden.devices import resolve_device

    resolve_device(str(ev.device))
    return EvaluationPlan(
        stages=stages,
        steps=tuple(steps),
        device=str(ev.device),
        dtype=str(ev.dtype),
        batch_size=int(ev.batch_size),
        seq_len=int(ev.seq_len),
        max_windows=None if ev.get("max_windows") is None else int(ev.max_windows),
        lambada_limit=limit,
        cka_sequences=int(ev.cka.n_sequences),
        seed=int(cfg.seed),
    )


@dataclass
class EvaluationResult:
    table: pd.DataFrame  # one row per evaluated step
    n_layers: int
    n_heads: int


def load_model(series: CheckpointSeries, step: int, plan: EvaluationPlan):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from garden.devices import resolve_device

    hf_logging.disable_progress_bar()
    folder = series.checkpoint_folder(step)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[plan.dtype])
    except Exception as err:
        raise GardenError(f"step {step}: cannot load the model from {folder}: {err}") from err
    return model.to(resolve_device(plan.device)).eval()


def load_tokenizer(series: CheckpointSeries, step: int):
    from transformers import AutoTokenizer

    folder = series.checkpoint_folder(step)
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as err:
        raise GardenError(f"no tokenizer in {folder} (needed to tokenize evaluation text): {err}") from err


def evaluate(series: CheckpointSeries, plan: EvaluationPlan, cfg, cache_dir: Path, progress: bool = True):
    """Run the plan's stages on each of its steps (final step first when CKA needs its activations)."""
    ev = cfg.evaluation
    fraction = float(cfg.model.get("train", {}).get("heldout_fraction", 0.05))
    tokenizer = load_tokenizer(series, plan.steps[-1])
    heldout = _series_heldout(series) if ev.text.source == "heldout" else None
    if heldout is not None:  # the tiny series' own held-out split, token for token
        ids, text = heldout, tokenizer.decode(heldout.tolist())
    else:
        text = data.eval_text(ev.text, cfg.corpus, Path(cfg.paths.data_dir), fraction)
        ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    windows = token_windows(ids, plan.seq_len, plan.max_windows)
    if "perplexity" in plan.stages and len(windows) == 0:
        raise GardenError(f"the evaluation text has {len(ids)} tokens: too few for seq_len={plan.seq_len}")
    examples = []
    if "lambada" in plan.stages:
        texts = data.load_lambada(ev.lambada, cfg.corpus, Path(cfg.paths.data_dir), fraction, text)
        examples = encode_lambada(texts, tokenizer, max_length=int(ev.lambada.max_length))
        if not examples:
            raise GardenError("no LAMBADA examples to score (empty source?)")
    batch = (
        data.cka_batch(ids, plan.cka_sequences, plan.seq_len, plan.seed)
        if "stability" in plan.stages
        else None
    )
    digest = hashlib.sha256(windows.numpy().tobytes())
    digest.update(json.dumps([(e.context, e.target) for e in examples]).encode())
    if batch is not None:
        digest.update(batch.tobytes())
    folder = Path(cache_dir) / plan.cache_key(series.identity, digest.hexdigest())
    folder.mkdir(parents=True, exist_ok=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    order = [plan.steps[-1], *plan.steps[:-1]] if batch is not None else list(plan.steps)
    reference = None
    records: dict[int, dict] = {}
    n_layers = n_heads = 0
    for step in tqdm(order, desc="evaluate checkpoints", unit="step", disable=not progress):
        path = folder / f"step{step}.json"
        if path.is_file():
            records[step] = json.loads(path.read_text())
            n_layers, n_heads = records[step]["n_layers"], records[step]["n_heads"]
            continue
        model = load_model(series, step, plan)
        n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
        record: dict = {"step": step, "n_layers": n_layers, "n_heads": n_heads}
        if "perplexity" in plan.stages:
            record["perplexity"] = token_perplexity(model, windows, plan.batch_size)
        if "lambada" in plan.stages:
            record.update(lambada_scores(model, examples, plan.batch_size, pad_id))
        if batch is not None:
            record.update(weight_ranks(model))
            acts = activations(model, torch.as_tensor(batch), plan.batch_size)
            if reference is None:
                reference = _final_activations(folder, acts if step == plan.steps[-1] else None)
            for kind, per_layer in acts.items():
                for layer, matrix in enumerate(per_layer):
                    record[f"cka_{kind}.{layer}"] = stability.linear_cka(matrix, reference[kind][layer])
        del model
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)
        records[step] = record
    table = pd.DataFrame([records[s] for s in plan.steps]).drop(columns=["n_layers", "n_heads"])
    return EvaluationResult(table, n_layers, n_heads)


def _series_heldout(series: CheckpointSeries) -> np.ndarray | None:
    """The held-out token ids a garden-trained series keeps beside its checkpoints (tokens.npz)."""
    root = getattr(series, "root", None)
    path = Path(root) / "tokens.npz" if root is not None else None
    if path is None or not path.is_file():
        return None
    with np.load(path) as saved:
        return saved["heldout"].astype(np.int64)


def _final_activations(folder: Path, fresh: dict | None) -> dict[str, list[torch.Tensor]]:
    """The final checkpoint's activations: saved when computed, read back on resume."""
    path = folder / "final_activations.npz"
    if fresh is not None:
        arrays = {f"{kind}.{i}": m.numpy() for kind, mats in fresh.items() for i, m in enumerate(mats)}
        with open(path.with_suffix(".tmp"), "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(path.with_suffix(".tmp"), path)
        return fresh
    if not path.is_file():
        raise GardenError(
            f"the final checkpoint's activations are missing from {folder}; delete it and rerun"
        )
    with np.load(path) as saved:
        out: dict[str, list[torch.Tensor]] = {}
        for key in sorted(saved.files, key=lambda k: (k.split(".")[0], int(k.split(".")[1]))):
            kind, _ = key.split(".")
            out.setdefault(kind, []).append(torch.from_numpy(saved[key]))
    return out


def weight_ranks(model) -> dict[str, float]:
    """PER and condition number of each block's MLP output weight; PER of each head's OV circuit."""
    n_heads = model.config.num_attention_heads
    out: dict[str, float] = {}
    for i, block in enumerate(model.gpt_neox.layers):
        s = torch.linalg.svdvals(block.mlp.dense_4h_to_h.weight.detach().double().cpu())
        out[f"per_mlp.{i}"] = stability.proportional_effective_rank(s)
        out[f"cond_mlp.{i}"] = stability.condition_number(s)
        heads = stability.ov_singular_values(
            block.attention.query_key_value.weight.detach().cpu(),
            block.attention.dense.weight.detach().cpu(),
            n_heads,
        )
        values = [stability.proportional_effective_rank(s_h) for s_h in heads]
        for h, value in enumerate(values):
            out[f"per_ov.{i}.{h}"] = value
        out[f"per_ov.{i}"] = float(np.mean(values))
        out[f"cond_ov.{i}"] = float(np.median([stability.condition_number(s_h) for s_h in heads]))
    return out


@torch.inference_mode()
def activations(model, batch: torch.Tensor, batch_size: int) -> dict[str, list[torch.Tensor]]:
    """Last-token outputs of every block's attention (OV output through attention.dense) and MLP."""
    device = next(model.parameters()).device
    captured: dict[str, list[list[torch.Tensor]]] = {"attn": [], "mlp": []}
    hooks = []
    for block in model.gpt_neox.layers:
        for kind, module in (("attn", block.attention.dense), ("mlp", block.mlp.dense_4h_to_h)):
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


def stable_from(steps: np.ndarray, values: np.ndarray, threshold: float) -> float | None:
    """First step from which values stay at or above threshold through the end."""
    from garden.metrics.events import onset_index

    index = onset_index(np.asarray(values) >= threshold)
    return None if index is None else float(steps[index])


def summarise(
    result: EvaluationResult, cfg, bifurcation_step: float | None, unit_bifurcation_step: float | None = None
) -> tuple[dict, pd.DataFrame | None]:
    """Summary metrics (steepest perplexity drop, its distance to the pooled and the per-unit
    bifurcation, CKA convergence) and the per-layer convergence table."""
    table, summary = result.table, {}
    steps = table["step"].to_numpy(dtype=float)
    if "perplexity" in table:
        ppl = table["perplexity"].to_numpy(dtype=float)
        summary["final_perplexity"] = float(ppl[-1])
        if len(ppl) >= 2:
            slope = np.diff(np.log(ppl)) / np.diff(np.log1p(steps))
            drop_step = float(steps[1:][int(np.argmin(slope))])
            summary["steepest_perplexity_drop_step"] = drop_step
            if bifurcation_step is not None:
                summary["bifurcation_to_perplexity_drop"] = drop_step - bifurcation_step
            if unit_bifurcation_step is not None:
                summary["unit_bifurcation_to_perplexity_drop"] = drop_step - unit_bifurcation_step
    for key in ("lambada_perplexity", "lambada_accuracy"):
        if key in table:
            summary[f"final_{key}"] = float(table[key].iloc[-1])
    layers = None
    if "cka_mlp.0" in table:
        threshold = float(cfg.evaluation.cka.threshold)
        rows = []
        for layer in range(result.n_layers):
            row = {"layer": layer, "per_mlp": float(table[f"per_mlp.{layer}"].iloc[-1]),
                   "per_ov": float(table[f"per_ov.{layer}"].iloc[-1])}  # fmt: skip
            for kind in ("attn", "mlp"):
                row[f"convergence_{kind}"] = stable_from(
                    steps, table[f"cka_{kind}.{layer}"].to_numpy(), threshold
                )
            rows.append(row)
        layers = pd.DataFrame(rows)
        for kind in ("attn", "mlp"):
            converged = layers[f"convergence_{kind}"].dropna()
            summary[f"cka_{kind}_converged_fraction"] = float(len(converged) / len(layers))
            if len(converged):
                summary[f"cka_{kind}_median_convergence_step"] = float(converged.median())
    return summary, layers
