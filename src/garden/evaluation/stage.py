"""The evaluation pass: load each selected checkpoint once, run every requested stage on it
(garden.evaluation.scorers registers the stages). Each finished
step is cached (one JSON per step, plus the final checkpoint's activations), so reruns and interrupted
runs pick up where they stopped. The cache folder's key covers the plan, the evaluation data, the final
checkpoint's content and the scorers' code (`garden.cache`); each step's record also names its own
checkpoint's content, so a checkpoint replaced on disk is scored again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from garden import cache, families
from garden.errors import GardenError
from garden.evaluation import data
from garden.evaluation.perplexity import encode_lambada, model_max_length, token_windows
from garden.evaluation.scorers import (
    Activations,
    Checkpoint,
    ScoringInputs,
    activations,
    score_checkpoint,
)
from garden.families import Family
from garden.progress import bar as progress_bar
from garden.schedule import select_steps
from garden.series import CheckpointSeries
from garden.settings import Settings

log = logging.getLogger("garden")


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

    def cache_key(self, series_identity: str, data_digest: str, final_content: str,
                  family: Family | None = None) -> str:  # fmt: skip
        """The records' folder: the series, the scored data, the final checkpoint's content, the settings
        and, where the stability stage reads the model through its family, that family's own code."""
        fields = asdict(self)
        del fields["steps"], fields["device"], fields["batch_size"]
        fields["final_step"] = self.steps[-1]
        if "stability" in self.stages:
            fields["family"] = cache.family_version(family)
        return cache.cache_key("evaluate", series=series_identity, data=data_digest, final=final_content,
                               **fields)  # fmt: skip


def plan_evaluation(settings: Settings, available_steps: list[int]) -> EvaluationPlan | None:
    """The evaluation's plan against the series, before any model is loaded (its settings are checked
    by the schema; what is left depends on the series and the disk)."""
    ev = settings.evaluation
    if not ev.stages:
        return None
    if "lambada" in ev.stages and ev.lambada.source == "file" and not Path(str(ev.lambada.path)).is_file():
        raise GardenError(f"evaluation.lambada.path={ev.lambada.path!r} is not a file (source=file)")
    steps = select_steps(available_steps, ev.steps)
    return EvaluationPlan(
        stages=ev.stages,
        steps=tuple(steps),
        device=str(settings.evaluation_device),
        dtype=ev.dtype,
        batch_size=ev.batch_size,
        seq_len=ev.seq_len,
        max_windows=ev.max_windows,
        lambada_limit=ev.lambada.limit,
        cka_sequences=ev.cka.n_sequences,
        seed=settings.seed,
    )


@dataclass
class EvaluationResult:
    table: pd.DataFrame  # one row per evaluated step
    n_layers: int
    n_heads: int
    scored: int = 0  # steps scored in this call; the others' records came from the cache


def load_model(series: CheckpointSeries, step: int, plan: EvaluationPlan):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder = series.checkpoint_folder(step)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, plan.dtype))
    except Exception as err:
        raise GardenError(f"step {step}: cannot load the model from {folder}: {err}") from err
    return model.to(plan.device).eval()


def load_tokenizer(series: CheckpointSeries, step: int):
    from transformers import AutoTokenizer

    folder = series.checkpoint_folder(step)
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as err:
        raise GardenError(f"no tokenizer in {folder} (needed to tokenize evaluation text): {err}") from err


def evaluate(series: CheckpointSeries, plan: EvaluationPlan, settings: Settings, cache_dir: Path,
             progress: bool = True, family: Family | None = None):  # fmt: skip
    """Run the plan's stages on each of its steps (final step first when CKA needs its activations);
    `family` says which modules the stability stage reads."""
    ev, corpus, data_dir = settings.evaluation, settings.corpus, Path(settings.paths.data_dir)
    log.info("evaluation of %d checkpoints (%s): preparing the text and the scorers", len(plan.steps),
             ", ".join(plan.stages))  # fmt: skip
    train = settings.model.train
    fraction = train.heldout_fraction if train is not None else ev.text.heldout_fraction
    tokenizer = load_tokenizer(series, plan.steps[-1])
    heldout = _series_heldout(series) if ev.text.source == "heldout" else None
    if heldout is not None:  # the tiny series' own held-out split, token for token
        ids, text = heldout, tokenizer.decode(heldout.tolist())
    else:
        text = data.eval_text(ev.text, corpus, data_dir, fraction)
        ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    windows = token_windows(ids, plan.seq_len, plan.max_windows)
    if "perplexity" in plan.stages and len(windows) == 0:
        raise GardenError(f"the evaluation text has {len(ids)} tokens: too few for seq_len={plan.seq_len}")
    examples = []
    if "lambada" in plan.stages:
        texts = data.load_lambada(ev.lambada, corpus, data_dir, fraction, text)
        max_length = ev.lambada.max_length
        if max_length is None:  # lm-eval's default: the model's context length
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(series.checkpoint_folder(plan.steps[-1]))
            max_length = model_max_length(config, tokenizer)
        examples = encode_lambada(texts, tokenizer, max_length=int(max_length))
        if not examples:
            raise GardenError("no LAMBADA examples to score (empty source?)")
    batch = None
    if "stability" in plan.stages:
        family = families.require(family, "evaluation stage stability")
        batch = data.cka_batch(ids, plan.cka_sequences, plan.seq_len, plan.seed)
    digest = hashlib.sha256(windows.numpy().tobytes())
    digest.update(json.dumps([(e.context, e.target) for e in examples]).encode())
    if batch is not None:
        digest.update(batch.tobytes())
    contents = {step: series.checkpoint_content_id(step) for step in plan.steps}
    folder = Path(cache_dir) / plan.cache_key(series.identity, digest.hexdigest(), contents[plan.steps[-1]],
                                              family)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = [plan.steps[-1], *plan.steps[:-1]] if batch is not None else list(plan.steps)
    with cache.producing(folder, f"the evaluation of {series.identity}"):
        records, scored = _evaluate_steps(series, plan, folder, order, contents, windows, examples, batch,
                                          pad_id, family, progress)  # fmt: skip
    n_layers, n_heads = records[plan.steps[-1]]["n_layers"], records[plan.steps[-1]]["n_heads"]
    table = pd.DataFrame([records[s] for s in plan.steps]).drop(columns=["n_layers", "n_heads", "content"])
    # One column order whether the records were scored now or read back from the cache (sorted there).
    table = table[["step", *sorted(c for c in table.columns if c != "step")]]
    return EvaluationResult(table, n_layers, n_heads, scored)


def _evaluate_steps(series, plan, folder, order, contents, windows, examples, batch, pad_id, family,
                    progress) -> tuple[dict[int, dict], int]:  # fmt: skip
    """Each step's record: read back when it was made from the same checkpoint content, else scored; and
    how many were scored."""
    inputs = ScoringInputs(windows, examples, None if batch is None else torch.as_tensor(batch), pad_id,
                           plan.batch_size)
    reference = None
    records: dict[int, dict] = {}
    scored = 0
    for step in progress_bar(order, desc="evaluate checkpoints", unit="step", enabled=progress):
        path = folder / f"step{step}.json"
        found = cache.read_json(path, "evaluation record")
        if found is not None and found.get("content") == contents[step]:
            records[step] = found
            continue
        model = load_model(series, step, plan)
        acts = None if batch is None else activations(model, inputs.batch, plan.batch_size, family)
        if acts is not None and reference is None:
            final = acts if step == plan.steps[-1] else None
            reference = _reference_activations(series, plan, folder, final, inputs.batch, family)
        checkpoint = Checkpoint(model, family, acts, reference)
        scores = score_checkpoint(checkpoint, plan.stages, inputs)
        record = {"step": step, "content": contents[step], **scores}
        del model
        cache.write_json(path, record)
        records[step] = record
        scored += 1
    return records, scored


def _reference_activations(series, plan, folder: Path, final: Activations | None, batch: torch.Tensor,
                           family) -> Activations:  # fmt: skip
    """The final checkpoint's activations: `final` when this is the final step (then saved), else read
    back, else (missing or damaged) computed again from the final checkpoint."""
    reference = _final_activations(folder, final)
    if reference is None:
        final_model = load_model(series, plan.steps[-1], plan)
        reference = _final_activations(folder, activations(final_model, batch, plan.batch_size, family))
        del final_model
    return reference


def _series_heldout(series: CheckpointSeries) -> np.ndarray | None:
    """The held-out token ids a garden-trained series keeps beside its checkpoints (tokens.npz)."""
    root = getattr(series, "root", None)
    path = Path(root) / "tokens.npz" if root is not None else None
    if path is None or not path.is_file():
        return None
    with np.load(path) as saved:
        return saved["heldout"].astype(np.int64)


def _final_activations(folder: Path, fresh: dict | None) -> dict[str, list[torch.Tensor]] | None:
    """The final checkpoint's activations: saved when computed, read back on resume (None when they
    are missing or damaged: the caller computes them again)."""
    path = folder / "final_activations.npz"
    if fresh is not None:
        arrays = {f"{kind}.{i}": m.numpy() for kind, mats in fresh.items() for i, m in enumerate(mats)}

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.savez(handle, **arrays)

        cache.atomic_write(path, write)
        return fresh

    def load(found: Path) -> dict[str, list[torch.Tensor]]:
        with np.load(found) as saved:
            out: dict[str, list[torch.Tensor]] = {}
            for key in sorted(saved.files, key=lambda k: (k.split(".")[0], int(k.split(".")[1]))):
                kind, _ = key.split(".")
                out.setdefault(kind, []).append(torch.from_numpy(saved[key]))
        return out

    return cache.read_or_none(path, load, "evaluation record")


def stable_from(steps: np.ndarray, values: np.ndarray, threshold: float) -> float | None:
    """First step from which values stay at or above threshold through the end."""
    from garden.metrics.events import onset_index

    index = onset_index(np.asarray(values) >= threshold)
    return None if index is None else float(steps[index])


def summarise(
    result: EvaluationResult, settings: Settings, bifurcation_step: float | None,
    unit_bifurcation_step: float | None = None
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
            # None (logged NaN) where the event was not reached: the distance is undefined, not zero.
            summary["bifurcation_to_perplexity_drop"] = (
                None if bifurcation_step is None else drop_step - bifurcation_step
            )
            summary["unit_bifurcation_to_perplexity_drop"] = (
                None if unit_bifurcation_step is None else drop_step - unit_bifurcation_step
            )
    for key in ("lambada_perplexity", "lambada_accuracy"):
        if key in table:
            summary[f"final_{key}"] = float(table[key].iloc[-1])
    layers = None
    if "cka_mlp.0" in table:
        threshold = settings.evaluation.cka.threshold
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
