"""The settings of the model-level evaluation stages (perplexity, LAMBADA, PER and CKA)."""

from __future__ import annotations

from dataclasses import dataclass, field

from garden.settings.declare import (
    FLOAT_DTYPES,
    LAMBADA_SOURCES,
    TEXT_SOURCES,
    _stages,
    section,
    setting,
)
from garden.settings.pipeline import StepSettings
from garden.settings.rules import (
    DEVICE,
    FRACTION,
    PROBABILITY,
    choice,
    integer,
    registered,
    text,
)


@dataclass(frozen=True, kw_only=True)
class TextSettings:
    source: str = setting(
        "heldout",
        choice(*TEXT_SOURCES),
        "heldout = the corpus tail the tiny series never trains on | file (path).",
    )
    path: str | None = setting(None, text(nullable=True), "source=file: the text file.")
    heldout_fraction: float = setting(
        0.05,
        PROBABILITY,
        "source=heldout for a series garden did not train: the corpus tail used as held-out text (the "
        "tiny series keeps its own split, model.train.heldout_fraction).",
    )


@dataclass(frozen=True, kw_only=True)
class LambadaSettings:
    source: str = setting(
        "heldout",
        choice(*LAMBADA_SOURCES),
        "heldout = LAMBADA-format passages cut from the held-out text (offline) | file "
        '(jsonl with "text", or one passage per line) | hub (EleutherAI/lambada_openai, '
        "as lm-eval-harness's lambada_openai).",
    )
    path: str | None = setting(None, text(nullable=True), "source=file: the passages.")
    dataset: str = setting("EleutherAI/lambada_openai", text(), "source=hub: the dataset.")
    config: str = setting("default", text(), "source=hub: the dataset's config.")
    split: str = setting("test", text(), "source=hub: the split.")
    limit: int | None = setting(
        None,
        integer(1, nullable=True),
        "At most this many passages (null = all: lambada_openai's 5153, as published perplexities use).",
    )
    heldout_passages: int = setting(500, integer(1), "Passages cut from the held-out text (source=heldout).")
    max_length: int | None = setting(
        None,
        integer(2, nullable=True),
        "Tokens the model reads per passage; null = the model's context length (lm-eval's default).",
    )


@dataclass(frozen=True, kw_only=True)
class CkaSettings:
    n_sequences: int = setting(
        128,
        integer(2),
        "The fixed batch (last token of each sequence), compared against the final checkpoint.",
    )
    threshold: float = setting(
        0.9, FRACTION, "A layer has converged from the first step after which its CKA stays at or above this."
    )


def _eval_steps() -> StepSettings:
    return StepSettings(select="eval")


@dataclass(frozen=True, kw_only=True)
class EvaluationSettings:
    stages: tuple[str, ...] = setting(
        [],
        registered(_stages, "evaluation stage", many=True),
        "Model-level stages on whole checkpoints (batched, on the GPU when there is one); [] runs none.",
    )
    steps: StepSettings = field(
        default_factory=_eval_steps,
        metadata={
            "section": StepSettings,
            "doc": "Which checkpoints to evaluate (as steps=); by default the "
            "eval subset (Pythia: 27 steps).",
        },
    )
    device: str = setting(
        "auto", DEVICE, "Where the models run (auto = cuda when present).", yaml="${device}"
    )
    dtype: str = setting("float32", choice(*FLOAT_DTYPES), "The models' dtype.")
    batch_size: int = setting(16, integer(1), "Sequences per forward pass.")
    seq_len: int = setting(128, integer(2), "Token windows for perplexity and the CKA sequences.")
    max_windows: int | None = setting(
        256,
        integer(1, nullable=True),
        "At most this many held-out windows for token perplexity (null = all).",
    )
    text: TextSettings = section(TextSettings, "The text token perplexity is measured on.")
    lambada: LambadaSettings = section(LambadaSettings, "The LAMBADA passages.")
    cka: CkaSettings = section(CkaSettings, "CKA convergence (paper 002).")
