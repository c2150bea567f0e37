"""One validation layer for every plain setting, run before any work: each error names the setting, its
value and what is valid, so a typo fails in a second instead of after training or reading a series.

Settings with their own richer checks (the step selection, evaluation stages, layer names, the unit axis)
are checked by their owners; this layer covers the rest by rule, plus the places garden writes to: the
MLflow store (opened and written once, in seconds) and `paths.*` (writable).
"""

from __future__ import annotations

import math
import re
import sqlite3
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from garden.errors import GardenError
from garden.extract import BAD_STEP_POLICIES


@dataclass(frozen=True)
class Rule:
    """A setting's type and range; `describe` is what the error says is valid."""

    describe: str
    accepts: Callable[[object], bool]
    nullable: bool = False


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def integer(low: int, high: int | None = None, nullable: bool = False) -> Rule:
    span = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    return Rule(
        span + (" or null" if nullable else ""),
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low and (high is None or v <= high),
        nullable,
    )


def number(low: float, high: float | None = None, *, low_open: bool = False, high_open: bool = False,
           nullable: bool = False) -> Rule:  # fmt: skip
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    span = f"a number in {left}{low:g}, {'inf' if high is None else f'{high:g}'}{right}"

    def accepts(v) -> bool:
        if not _number(v):
            return False
        above = v > low if low_open else v >= low
        below = high is None or (v < high if high_open else v <= high)
        return above and below

    return Rule(span + (" or null" if nullable else ""), accepts, nullable)


def choice(*values: str) -> Rule:
    return Rule(f"one of {', '.join(values)}", lambda v: v in values)


_ABSENT = object()
BOOLEAN = Rule("true or false", lambda v: isinstance(v, bool))
PROBABILITY = number(0.0, 1.0, low_open=True, high_open=True)
POSITIVE = number(0.0, low_open=True)
NONNEGATIVE = number(0.0)

#: Every plain setting of the config tree with its rule (dotted key -> Rule).
SETTINGS: dict[str, Rule] = {
    "seed": integer(0),
    "progress": BOOLEAN,
    "figures": BOOLEAN,
    "steps.count": integer(2),
    "series.on_bad_step": choice(*BAD_STEP_POLICIES),
    "series.prefetch": integer(0, 64),
    "series.retries": integer(0),
    "series.backoff_seconds": NONNEGATIVE,
    "series.timeout_seconds": POSITIVE,
    "extract.subsample": integer(1, nullable=True),
    "extract.n_trajectories": integer(1),
    "extract.n_distribution_sample": integer(4),  # the dip test needs 4 values, the mixture 2
    "extract.histogram_bins": integer(2),
    "extract.quantile_bins": integer(2),
    "extract.histogram_range": number(0.0, low_open=True, nullable=True),
    "extract.reference_step": integer(0, nullable=True),
    "extract.chunk_size": integer(1024),
    "extract.unit_sample": integer(4),
    "metrics.bimodality_threshold": PROBABILITY,
    "metrics.dip_pvalue": PROBABILITY,
    "metrics.ashman_d_threshold": POSITIVE,
    "metrics.gmm_min_weight": number(0.0, 0.5, high_open=True),
    "metrics.stationary_threshold": PROBABILITY,
    "metrics.alpha_min_step": integer(0),
    "metrics.alpha_max_step": integer(1, nullable=True),
    "metrics.lag_msd_max_lag": integer(1),
    "metrics.msd_max_regimes": integer(1, 6),
    "metrics.msd_min_points": integer(2),
    "metrics.unit_fdr": PROBABILITY,
    "metrics.unit_fraction_threshold": number(0.0, 1.0, low_open=True),
    "evaluation.cka.threshold": number(0.0, 1.0, low_open=True),
    # Stricter than plan_evaluation's "positive" (which owns batch_size, max_windows and cka.n_sequences):
    # a window of one token predicts nothing.
    "evaluation.seq_len": integer(2),
    "cooccurrence.attention_move_fraction": PROBABILITY,
    "cooccurrence.seed": integer(0),
}

#: The tiny series' trainer (model.source=tiny).
TINY_SETTINGS: dict[str, Rule] = {
    "model.architecture.vocab_size": integer(8),
    "model.architecture.hidden_size": integer(1),
    "model.architecture.num_hidden_layers": integer(1),
    "model.architecture.num_attention_heads": integer(1),
    "model.architecture.intermediate_size": integer(1),
    "model.architecture.max_position_embeddings": integer(2),
    "model.architecture.rotary_pct": number(0.0, 1.0, low_open=True),
    "model.architecture.use_parallel_residual": BOOLEAN,
    "model.train.steps": integer(1),
    "model.train.interval": integer(1),
    "model.train.batch_size": integer(1),
    "model.train.seq_len": integer(2),
    "model.train.lr": POSITIVE,
    "model.train.min_lr_ratio": number(0.0, 1.0),
    "model.train.warmup_fraction": number(0.0, 1.0, high_open=True),
    "model.train.weight_decay": NONNEGATIVE,
    "model.train.grad_clip": POSITIVE,
    "model.train.heldout_fraction": PROBABILITY,
    "model.train.save_dtype": choice("float32", "float16", "bfloat16"),
    "model.train.seed": integer(0),
}


def check_settings(cfg: DictConfig) -> None:
    """Every rule of SETTINGS (and TINY_SETTINGS for the tiny source), then the cross-setting checks."""
    rules = dict(SETTINGS)
    if cfg.model.get("source") == "tiny":
        rules.update(TINY_SETTINGS)
    for key, rule in rules.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT or (value is None and rule.nullable):
            continue  # a setting this config tree does not have (e.g. a model without `train`)
        if not rule.accepts(value):
            raise GardenError(f"{key}={value!r} is not valid; valid: {rule.describe}")
    quantiles = OmegaConf.select(cfg, "extract.quantiles", default=None) or []
    if not all(_number(q) and 0 < q < 1 for q in quantiles):
        raise GardenError(f"extract.quantiles={list(quantiles)!r} is not valid; valid: numbers in (0, 1)")
    max_step = cfg.metrics.get("alpha_max_step")
    if max_step is not None and max_step <= cfg.metrics.alpha_min_step:
        raise GardenError(
            f"metrics.alpha_max_step={max_step} is not valid; valid: null or above "
            f"metrics.alpha_min_step={cfg.metrics.alpha_min_step}"
        )
    if cfg.model.get("source") == "tiny":
        _check_tiny(cfg.model)
    _check_family(cfg)
    endpoint = OmegaConf.select(cfg, "series.endpoint", default=None)
    if endpoint is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", str(endpoint)):
        raise GardenError(f"series.endpoint={endpoint!r} is not valid; valid: null (HF_ENDPOINT, else "
                          "the Hub) or an http(s):// URL of a Hub-API server")  # fmt: skip


def _check_tiny(model) -> None:
    arch, train = model.architecture, model.train
    if arch.hidden_size % arch.num_attention_heads:
        raise GardenError(
            f"model.architecture.hidden_size={arch.hidden_size} is not valid; valid: a multiple of "
            f"model.architecture.num_attention_heads={arch.num_attention_heads}"
        )
    if train.seq_len > arch.max_position_embeddings:
        raise GardenError(
            f"model.train.seq_len={train.seq_len} is not valid; valid: at most "
            f"model.architecture.max_position_embeddings={arch.max_position_embeddings}"
        )
    betas = list(train.betas)
    if len(betas) != 2 or not all(_number(b) and 0 <= b < 1 for b in betas):
        raise GardenError(f"model.train.betas={betas!r} is not valid; valid: two numbers in [0, 1)")


# ------------------------------------------------------------------------------- where garden writes


def check_writable(key: str, folder: str | Path) -> None:
    """Create the folder if needed and write (then delete) a file in it."""
    path = Path(folder).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".garden-write-check."):
            pass
    except OSError as err:
        raise GardenError(f"{key}={str(folder)!r} is not writable ({err.strerror or err}); "
                          "valid: a folder garden can create and write to") from None  # fmt: skip


def _check_family(cfg: DictConfig) -> None:
    """model.family (a registered family), model.revision_pattern (a regex with a `step` group) and
    layer.role (a role every family maps), before any series is listed."""
    from garden import families
    from garden.layers import check_role

    families.configured(cfg.model)
    pattern = cfg.model.get("revision_pattern")
    if pattern is not None:
        try:
            compiled = re.compile(str(pattern))
        except re.error as err:
            raise GardenError(f"model.revision_pattern={pattern!r} is not a regex: {err}") from None
        if "step" not in compiled.groupindex:
            raise GardenError(
                f"model.revision_pattern={pattern!r} is not valid; valid: a regex with a (?P<step>\\d+) group"
                " (and optionally (?P<tokens>\\d+), in billions)"
            )
    if cfg.get("layer") is not None:
        check_role(cfg.layer)


def check_paths(cfg: DictConfig) -> None:
    check_writable("paths.data_dir", cfg.paths.data_dir)
    if cfg.model.get("source") == "hub":
        check_writable("paths.cache_dir", cfg.paths.cache_dir)
    if cfg.paths.get("hf_cache"):
        check_writable("paths.hf_cache", cfg.paths.hf_cache)


def check_tracking_store(uri: str, timeout_seconds: float = 5.0) -> None:
    """Open the MLflow store and write to it once, in seconds, before a run is created. A sqlite store
    takes (and rolls back) a write lock; a file store gets a probe file; an HTTP server answers /health.
    Other stores (databases, Databricks) are left to MLflow."""
    parsed = urllib.parse.urlparse(uri)
    valid = "a sqlite:///<path>, file:<folder> or http(s):// MLflow store garden can write to"
    try:
        if parsed.scheme == "sqlite":
            path = uri.removeprefix("sqlite:///")
            if path in ("", ":memory:"):
                return
            parent = Path(path).expanduser().resolve().parent
            if not parent.is_dir():
                raise GardenError(f"tracking.uri={uri!r}: the folder {parent} does not exist; valid: {valid}")
            if not Path(path).expanduser().exists():  # MLflow creates it: the folder must take a file
                with tempfile.NamedTemporaryFile(dir=parent, prefix=".garden-write-check."):
                    return
            connection = sqlite3.connect(path, timeout=timeout_seconds)
            try:
                connection.execute("BEGIN IMMEDIATE")
                connection.rollback()
            finally:
                connection.close()
        elif parsed.scheme in ("", "file"):
            folder = parsed.path if parsed.scheme == "file" else uri
            check_writable("tracking.uri", folder)
        elif parsed.scheme in ("http", "https"):
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_seconds):
                pass
    except GardenError:
        raise
    except (OSError, sqlite3.Error) as err:
        raise GardenError(
            f"tracking.uri={uri!r} cannot be opened for writing ({err}); valid: {valid}"
        ) from None


def check_environment(cfg: DictConfig) -> None:
    """The places garden writes to: the data folder, the Hugging Face cache and the MLflow store."""
    check_paths(cfg)
    check_tracking_store(str(cfg.tracking.uri))


VARIANTS = ("standard", "deduped")


def check_config(cfg: DictConfig) -> None:
    """Every check of a dynamics job that needs no weights; each error names the valid choices."""
    from garden.devices import resolve_device
    from garden.metrics import validate_metric_names
    from garden.metrics.events import BIFURCATION_CRITERIA
    from garden.series import DUPLICATE_POLICIES

    variant = cfg.get("variant")
    if variant not in VARIANTS:
        raise GardenError(f"variant={variant!r} is not valid; valid: {', '.join(VARIANTS)}")
    has = list(cfg.model.get("variants") or VARIANTS)
    if variant not in has:
        raise GardenError(f"model={cfg.model.name} has no {variant} variant; it has: {', '.join(has)}")
    validate_metric_names(cfg.metrics.names)
    if cfg.series.get("on_duplicate") not in DUPLICATE_POLICIES:
        raise GardenError(
            f"series.on_duplicate={cfg.series.get('on_duplicate')!r} is not valid; "
            f"valid: {', '.join(DUPLICATE_POLICIES)}"
        )
    criterion = cfg.metrics.get("bifurcation_criterion")
    if criterion not in BIFURCATION_CRITERIA:
        raise GardenError(
            f"metrics.bifurcation_criterion={criterion!r} is not valid; "
            f"valid: {', '.join(BIFURCATION_CRITERIA)}"
        )
    from garden.sources import source_of

    source_of(cfg)
    check_settings(cfg)
    resolve_device(str(cfg.device))
    check_environment(cfg)
