"""`model.source=hub`: a repository on the Hugging Face Hub or any server speaking its API."""

from __future__ import annotations

from omegaconf import DictConfig

from garden.errors import GardenError
from garden.sources.registry import register


def hub_repo(cfg: DictConfig) -> str:
    """The repository of the chosen variant (`-deduped` repos hold the deduplicated-Pile runs)."""
    repo = cfg.model.get("deduped_repo") if cfg.variant == "deduped" else cfg.model.get("repo")
    if not repo:
        raise GardenError(f"model={cfg.model.name} names no repository for variant={cfg.variant}")
    return str(repo)


@register("hub", caches=("hub_tensor",))
def open_hub(cfg: DictConfig):
    from garden import families
    from garden.hub import HubSeries

    return HubSeries(
        hub_repo(cfg),
        label=str(cfg.model.name),
        cache_dir=cfg.paths.cache_dir,
        hf_cache=cfg.paths.get("hf_cache"),
        endpoint=cfg.series.get("endpoint"),
        retries=int(cfg.series.retries),
        backoff_seconds=float(cfg.series.backoff_seconds),
        timeout_seconds=float(cfg.series.timeout_seconds),
        family=families.configured(cfg.model),
        revision_pattern=cfg.model.get("revision_pattern"),
    )
