"""The settings of the analysis pipeline: where garden writes, how series are read, the pass, the
metrics, the steps, the layer and the MLflow record."""

from __future__ import annotations

from dataclasses import MISSING, dataclass

from garden.settings.declare import (
    BAD_STEP_POLICIES,
    BIFURCATION_CRITERIA,
    DUPLICATE_POLICIES,
    STEP_SELECTIONS,
    _metrics,
    _roles,
    setting,
)
from garden.settings.rules import (
    BOOLEAN,
    FRACTION,
    HUB_ENDPOINT,
    NONNEGATIVE,
    POSITIVE,
    PROBABILITY,
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


@dataclass(frozen=True, kw_only=True)
class PathSettings:
    data_dir: str = setting(
        "data",
        text(),
        yaml="${oc.env:GARDEN_DATA_DIR,data}",
        doc="Trained series, downloaded corpora and extraction caches (resumable, keyed by "
        "what they depend on).",
    )
    cache_dir: str = setting(
        "data/cache",
        text(),
        yaml="${oc.env:GARDEN_CACHE,${paths.data_dir}/cache}",
        doc="garden's own cache of what it range-read from a Hub (tensors, per-repository manifests).",
    )
    hf_cache: str | None = setting(
        None,
        text(nullable=True),
        "Hugging Face cache for whole downloads (shard indexes, legacy .bin, "
        "checkpoints for model-level stages); null = the standard one "
        "(HF_HUB_CACHE / HF_HOME).",
    )


@dataclass(frozen=True, kw_only=True)
class SeriesSettings:
    on_duplicate: str = setting(
        "exclude",
        choice(*DUPLICATE_POLICIES),
        "Checkpoints whose weights are byte-identical to an earlier one (Pythia ships "
        "several such branches): exclude (with a warning naming them), keep or error.",
    )
    on_bad_step: str = setting(
        "error",
        choice(*BAD_STEP_POLICIES),
        "A checkpoint whose tensor has the wrong shape or NaN/inf values: error (the job "
        "fails naming the step) or exclude (dropped with a warning, recorded in the run "
        "as tag garden.excluded_steps and summary n_excluded_steps).",
    )
    endpoint: str | None = setting(
        None,
        HUB_ENDPOINT,
        "The Hub-API server of model.source=hub: null = HF_ENDPOINT, else "
        "https://huggingface.co; a mirror or a self-hosted Hub works as it is.",
    )
    prefetch: int = setting(
        4,
        integer(0, 64),
        "Hub reads: while step k is computed, steps k+1..k+prefetch are fetched (at most "
        "this many tensors held in memory; 0 = fetch each step when it is needed).",
    )
    keep_files: bool = setting(
        False,
        BOOLEAN,
        "Hub scans (task=scan): also keep the tensors fetched for a scan in garden's cache (paths.cache_dir, "
        "reused offline by later jobs); false keeps nothing once a step is done, so a scan of a large suite "
        "holds a few steps' bytes on disk.",
    )
    retries: int = setting(
        5,
        integer(0),
        "Hub fetches: attempts after the first. Only connection errors, timeouts, 429/5xx "
        "answers and short bodies are retried; other answers fail at once.",
    )
    backoff_seconds: float = setting(1.0, NONNEGATIVE, "The first wait before a retry (doubling each time).")
    timeout_seconds: float = setting(60, POSITIVE, "Seconds a Hub request may wait for an answer.")


@dataclass(frozen=True, kw_only=True)
class ExtractSettings:
    subsample: int | None = setting(
        None,
        integer(2, nullable=True),
        "Analyse a seeded random subset of this many parameters instead of the whole tensor (null = all).",
    )
    n_trajectories: int = setting(
        256,
        integer(0),
        "Parameters whose values are recorded at every step (the forking-paths figure, lag MSD).",
    )
    n_distribution_sample: int = setting(
        20000,
        integer(4),
        "Seeded sample of parameter values kept per step for the dip test "
        "(4 values at least) and the Gaussian mixture.",
    )
    histogram_bins: int = setting(
        256,
        integer(2),
        "Display histogram bins on fixed edges shared by all steps (density-over-time heatmap).",
    )
    quantile_bins: int = setting(
        65536,
        integer(2),
        "Quantiles are read off a fine histogram of this many bins on the same edges "
        "(a multiple of histogram_bins).",
    )
    quantiles: tuple[float, ...] = setting(
        [0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99],
        list_of(PROBABILITY, "a list of numbers in (0, 1)"),
        "The quantiles recorded per step.",
    )
    histogram_range: float | None = setting(
        None,
        number(0.0, low_open=True, nullable=True),
        "Histogram half-range; null = 1.25 x the largest |value| of the reference and final steps.",
    )
    reference_step: int | None = setting(
        None, integer(0, nullable=True), "Step the MSD is measured from; null = the first selected step."
    )
    chunk_size: int = setting(
        262144,
        integer(1024),
        "Elements per chunk of the fused statistics pass (cache-sized: 256K float32 "
        "values fit in L2 with room for the pass's two work buffers; 1M was ~25% "
        "slower on 2 cores, 128K too).",
    )
    unit_axis: str | int | None = setting(
        "auto",
        UNIT_AXIS,
        "Per-unit statistics in the same pass: a unit is one slice of a 2-D "
        "tensor along this axis. auto = axis 1 (for embed_out.weight "
        "[vocab, hidden]: one hidden unit's weights to every token; nothing "
        "for a 1-D tensor or with a subsample); 0 = one row per unit; "
        "null = off.",
    )
    unit_sample: int = setting(
        4096,
        integer(4),
        "Entries of each unit (seeded, the same positions at every step) that its dip "
        "test runs on (the dip test needs 4).",
    )
    seed: int = setting(
        0, integer(0), "Seed of the subsample, the trajectories and the samples.", yaml="${seed}"
    )


@dataclass(frozen=True, kw_only=True)
class MetricSettings:
    names: tuple[str, ...] = setting(
        [
            "msd",
            "displacement",
            "lag_msd",
            "alpha",
            "msd_regimes",
            "moments",
            "bimodality_coefficient",
            "dip",
            "gmm",
            "bifurcation",
            "stationary",
            "unit_bimodality",
        ],
        registered(_metrics, "metric", many=True, min_length=1),
        "The metrics to compute (the registry's names).",
    )
    bifurcation_criterion: str = setting(
        "bimodality_coefficient",
        choice(*BIFURCATION_CRITERIA),
        "Which bimodality criterion defines the bifurcation onset.",
    )
    bimodality_threshold: float = setting(
        5 / 9,
        PROBABILITY,
        "Sarle's coefficient above this (5/9, the uniform distribution's value) reads as bimodal.",
    )
    dip_pvalue: float = setting(0.05, PROBABILITY, "Hartigan's dip: bimodal when the p-value is below this.")
    ashman_d_threshold: float = setting(
        2.0,
        POSITIVE,
        "Gaussian mixture: bimodal when Ashman's D exceeds this and the "
        "smaller component weighs at least gmm_min_weight.",
    )
    gmm_min_weight: float = setting(
        0.05,
        number(0.0, 0.5, high_open=True),
        "The smaller mixture component's least weight for a bimodal reading.",
    )
    stationary_threshold: float = setting(
        0.05,
        PROBABILITY,
        "Stationary step: the first step after which displacement / its "
        "peak stays below this (working definition).",
    )
    alpha_min_step: int = setting(1, integer(0), "First training step of the MSD ~ t^alpha fit window.")
    alpha_max_step: int | None = setting(
        None, integer(1, nullable=True), "Last training step of the fit window (null = the last step)."
    )
    msd_max_regimes: int = setting(
        3,
        integer(1, 6),
        "MSD regimes: a power law per regime, at most this many (how many: BIC), "
        "e.g. ballistic (alpha ~ 2), diffusive (~ 1), a plateau (~ 0).",
    )
    msd_min_points: int = setting(4, integer(2), "Checkpoints each MSD regime spans at least.")
    lag_msd_max_lag: int = setting(
        20,
        integer(1),
        "Longest lag (in checkpoints of the evenly spaced part of the schedule) for the time-averaged MSD.",
    )
    unit_fdr: float = setting(
        0.05,
        PROBABILITY,
        "Per unit: a unit is bimodal at a step when its dip p-value survives "
        "Benjamini-Hochberg control of the false discovery rate at this level over all "
        "units of that step.",
    )
    unit_fraction_threshold: float = setting(
        0.1,
        FRACTION,
        "The unit bifurcation: the first checkpoint from which at least "
        "this fraction of units stays bimodal.",
    )


@dataclass(frozen=True, kw_only=True)
class StepSettings:
    select: str = setting(
        "all",
        choice(*STEP_SELECTIONS),
        "Which checkpoints: all, eval (the 27-step-style subset), every (steps.stride), "
        "list (steps.values) or log (steps.count, evenly spaced in log(step)).",
    )
    stride: int = setting(10, integer(1), "select=every: every stride-th checkpoint, first and last kept.")
    values: tuple[int, ...] | None = setting(
        None,
        list_of(integer(0), "a list of training steps", min_length=1, nullable=True),
        "select=list: the training steps (each must exist).",
    )
    count: int = setting(30, integer(2), "select=log: how many checkpoints, step 0 kept when present.")


@dataclass(frozen=True, kw_only=True)
class LayerSettings:
    name: str = setting(MISSING, text(), "What run names show for the layer.")
    role: str | None = setting(
        None,
        registered(_roles, "role", nullable=True),
        "A role every model family maps to its own tensor (garden.families).",
    )
    index: int | None = setting(
        None,
        Rule("an integer or null", is_integer, nullable=True),
        "Transformer block of a block role; negative values count from the last.",
    )
    tensor: str | None = setting(
        None, text(nullable=True), "An exact tensor name to analyse any tensor (overrides role)."
    )


@dataclass(frozen=True, kw_only=True)
class TrackingSettings:
    uri: str = setting(
        "sqlite:///mlflow.db",
        text(),
        yaml="${oc.env:MLFLOW_TRACKING_URI,sqlite:///mlflow.db}",
        doc="The MLflow store: a sqlite store in the working directory unless "
        "MLFLOW_TRACKING_URI says otherwise.",
    )
    experiment: str = setting("garden", text(), "The MLflow experiment.")
    run_name: str | None = setting(None, text(nullable=True), "null = <model>/<variant>/<layer>.")
