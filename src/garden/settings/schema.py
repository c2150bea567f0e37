"""Every setting of garden's config tree, written once: its type, default, valid values and what it does.

One frozen dataclass per config section (`pipeline`, `models`, `evaluation`: the analysis, what is
analysed, the model-level stages), each field written with `declare.setting`; `GardenConfig` here joins
them into the tree. A field's default is the setting's default (`conf/settings.yaml`
is generated from these, `python -m garden.settings yaml`; a test keeps it current), its rule says what
is valid (garden.settings.rules), its doc is what the YAML comment, `python -m garden.settings docs` and
the errors say. A field without a default is set by the chosen option of its config group (`model=`,
`layer=`, `steps=`). Relations between settings (`RELATIONS`) are checked after every single rule.

`garden.settings.resolve` reads a composed config through this schema into typed `Settings`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from garden.settings.declare import (
    BAD_STEP_POLICIES,
    BIFURCATION_CRITERIA,
    DUPLICATE_POLICIES,
    STEP_SELECTIONS,
    VARIANTS,
    _tasks,
    section,
    setting,
)
from garden.settings.evaluation import CkaSettings, EvaluationSettings, LambadaSettings, TextSettings
from garden.settings.models import (
    CooccurrenceSettings,
    CorpusSettings,
    EarlyStopSettings,
    ModelSettings,
    ScanSettings,
    StudySettings,
    TinyArchitecture,
    TinyTraining,
)
from garden.settings.pipeline import (
    ExtractSettings,
    LayerSettings,
    MetricSettings,
    PathSettings,
    SeriesSettings,
    StepSettings,
    TrackingSettings,
)
from garden.settings.rules import BOOLEAN, DEVICE, choice, integer, registered

__all__ = ["BAD_STEP_POLICIES", "BIFURCATION_CRITERIA", "DUPLICATE_POLICIES", "RELATIONS", "STEP_SELECTIONS",
           "VARIANTS", "CkaSettings", "CooccurrenceSettings", "CorpusSettings", "EvaluationSettings",
           "ExtractSettings", "GardenConfig", "LambadaSettings", "LayerSettings", "MetricSettings",
           "ModelSettings", "PathSettings", "ScanSettings", "SeriesSettings", "StepSettings", "StudySettings",
           "TextSettings", "TinyArchitecture", "TinyTraining", "TrackingSettings"]  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class GardenConfig:
    """The whole tree: top-level settings, then one section per group."""

    task: str = setting(
        "dynamics",
        registered(_tasks, "task"),
        "What the job does: dynamics (analyse a checkpoint series) | cooccurrence (paper 003's "
        "synthetic task, trained here, then analysed as a series).",
    )
    variant: str = setting("standard", choice(*VARIANTS), "Training-data variant of the model suite.")
    seed: int = setting(0, integer(0), "The seed every seeded setting defaults to.")
    device: str = setting("auto", DEVICE, "auto = cuda when present, else cpu.")
    progress: bool = setting(True, BOOLEAN, "Progress bars while training and extracting.")
    figures: bool = setting(
        True,
        BOOLEAN,
        "Each run's figures; false keeps only the tables (a large sweep looked at with garden.compare).",
    )
    paths: PathSettings = section(PathSettings)
    series: SeriesSettings = section(SeriesSettings)
    extract: ExtractSettings = section(ExtractSettings)
    metrics: MetricSettings = section(MetricSettings)
    steps: StepSettings = section(StepSettings)
    layer: LayerSettings = section(LayerSettings)
    model: ModelSettings = section(ModelSettings)
    tracking: TrackingSettings = section(TrackingSettings)
    corpus: CorpusSettings = section(CorpusSettings)
    evaluation: EvaluationSettings = section(EvaluationSettings)
    cooccurrence: CooccurrenceSettings = section(CooccurrenceSettings)
    early_stop: EarlyStopSettings = section(EarlyStopSettings)
    scan: ScanSettings = section(ScanSettings)
    study: StudySettings | None = section(
        StudySettings, "Only in the DVC study's params.yaml.", optional=True
    )


# ------------------------------------------------------------------------------------------ relations


def _multiple_of_heads(c: GardenConfig) -> tuple[str, object, str] | None:
    arch = c.model.architecture or {}
    if c.model.source == "tiny" and arch["hidden_size"] % arch["num_attention_heads"]:
        return (
            "model.architecture.hidden_size",
            arch["hidden_size"],
            f"a multiple of model.architecture.num_attention_heads={arch['num_attention_heads']}",
        )
    return None


def _sequence_fits(c: GardenConfig) -> tuple[str, object, str] | None:
    arch, train = c.model.architecture or {}, c.model.train
    if c.model.source == "tiny" and train is not None and train.seq_len > arch["max_position_embeddings"]:
        return (
            "model.train.seq_len",
            train.seq_len,
            f"at most model.architecture.max_position_embeddings={arch['max_position_embeddings']}",
        )
    return None


def _alpha_window(c: GardenConfig) -> tuple[str, object, str] | None:
    high, low = c.metrics.alpha_max_step, c.metrics.alpha_min_step
    if high is not None and high <= low:
        return "metrics.alpha_max_step", high, f"null or above metrics.alpha_min_step={low}"
    return None


def _quantile_grid(c: GardenConfig) -> tuple[str, object, str] | None:
    if c.extract.quantile_bins % c.extract.histogram_bins:
        return (
            "extract.quantile_bins",
            c.extract.quantile_bins,
            f"a multiple of extract.histogram_bins={c.extract.histogram_bins}",
        )
    return None


def _units_need_whole_tensor(c: GardenConfig) -> tuple[str, object, str] | None:
    if c.extract.subsample is not None and c.extract.unit_axis in (0, 1):
        return (
            "extract.unit_axis",
            c.extract.unit_axis,
            f"auto or null while extract.subsample={c.extract.subsample} analyses a random subset of "
            "the parameters, which has no units (set extract.subsample=null or extract.unit_axis=null)",
        )
    return None


def _layer_named(c: GardenConfig) -> tuple[str, object, str] | None:
    if not c.layer.tensor and c.layer.role is None:
        return "layer.role", None, "a role or layer.tensor=<exact tensor name>"
    return None


def _variant_exists(c: GardenConfig) -> tuple[str, object, str] | None:
    if c.variant not in c.model.variants:
        return ("variant", c.variant, f"{', '.join(c.model.variants)} "
                f"(model={c.model.name} has no {c.variant} variant)")
    return None


def _tiny_is_configured(c: GardenConfig) -> tuple[str, object, str] | None:
    if c.model.source == "tiny" and (c.model.train is None or not c.model.architecture):
        return "model", c.model.name, "a tiny model config with architecture and train sections"
    return None


def _file_sources_have_paths(c: GardenConfig) -> tuple[str, object, str] | None:
    if c.evaluation.text.source == "file" and not c.evaluation.text.path:
        return "evaluation.text.path", None, "a text file (evaluation.text.source=file)"
    return None


def _early_stop_trains_tiny(c: GardenConfig) -> tuple[str, object, str] | None:
    if c.task == "early_stop" and c.model.source != "tiny":
        return "model", c.model.name, "tiny (task=early_stop trains the tiny series, once per seed)"
    return None


#: Checks that involve two settings or more; each returns (key, value, what is valid) when it fails.
RELATIONS: tuple[Callable[[GardenConfig], tuple[str, object, str] | None], ...] = (
    _tiny_is_configured,
    _early_stop_trains_tiny,
    _multiple_of_heads,
    _sequence_fits,
    _alpha_window,
    _quantile_grid,
    _units_need_whole_tensor,
    _layer_named,
    _variant_exists,
    _file_sources_have_paths,
)
