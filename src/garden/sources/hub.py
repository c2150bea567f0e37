"""`model.source=hub`: a repository on the Hugging Face Hub or any server speaking its API."""

from __future__ import annotations

from garden.errors import GardenError
from garden.settings import Settings
from garden.sources.registry import register


def hub_repo(settings: Settings) -> str:
    """The repository of the chosen variant (`-deduped` repos hold the deduplicated-Pile runs)."""
    model = settings.model
    repo = model.deduped_repo if settings.variant == "deduped" else model.repo
    if not repo:
        raise GardenError(f"model={model.name} names no repository for variant={settings.variant}")
    return repo


@register("hub", caches=("hub_tensor",))
def open_hub(settings: Settings):
    from garden.hub import HubSeries

    series = settings.series
    return HubSeries(
        hub_repo(settings),
        label=settings.model.name,
        cache_dir=settings.paths.cache_dir,
        hf_cache=settings.paths.hf_cache,
        endpoint=series.endpoint,
        retries=series.retries,
        backoff_seconds=series.backoff_seconds,
        timeout_seconds=series.timeout_seconds,
        family=settings.family,
        revision_pattern=settings.model.revision_pattern,
        keep_files=series.keep_files,
    )
