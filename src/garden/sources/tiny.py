"""`model.source=tiny`: the small GPT-NeoX series garden trains itself (garden.tiny), as a lazy series:
its steps, tensor names, shapes and config are known from the config, and it trains on the first read."""

from __future__ import annotations

import threading
from functools import cached_property
from pathlib import Path

from omegaconf import DictConfig

from garden.families import Revision
from garden.series import LocalSeries
from garden.sources import CONTENT_IDS, register


class TinySeries(LocalSeries):
    """The tiny series' folder, trained (or resumed, or waited for while another job trains it) the first
    time anything needs its files; what the config already says is answered without training."""

    def __init__(self, cfg: DictConfig):
        from garden.tiny import tiny_series_dir

        self.cfg = cfg
        self.data_dir = Path(cfg.paths.data_dir)
        folder = tiny_series_dir(cfg.model, cfg.corpus, self.data_dir, str(cfg.variant))
        super().__init__(folder, label="tiny", memo_dir=self.data_dir / CONTENT_IDS, must_exist=False)
        self._training = threading.Lock()

    def prepare(self) -> None:
        from garden.tiny import ensure_tiny_series

        cfg = self.cfg
        with self._training:
            ensure_tiny_series(cfg.model, cfg.corpus, self.data_dir, str(cfg.device), bool(cfg.progress),
                               str(cfg.variant))  # fmt: skip

    @cached_property
    def revisions(self) -> dict[int, Revision]:
        self.prepare()
        return super().revisions

    def steps(self) -> list[int]:
        from garden.tiny import checkpoint_steps

        return checkpoint_steps(self.cfg.model.train)

    def tensor_names(self, step: int) -> list[str]:
        from garden.tiny import tensor_names_on_disk

        return tensor_names_on_disk(self.cfg.model)

    def tensor_shape(self, step: int, name: str) -> tuple[int, ...] | None:
        from garden.tiny import tensor_shapes_on_disk

        return tensor_shapes_on_disk(self.cfg.model).get(name)

    def model_config(self) -> dict | None:
        from garden.tiny import neox_config

        return neox_config(self.cfg.model).to_dict()

    def artifacts(self) -> list[Path]:
        from garden.tiny import COMPLETE_MARKER

        return [self.root / "train_log.csv", self.root / COMPLETE_MARKER]


@register("tiny", caches=("tiny",))
def open_tiny(cfg: DictConfig) -> TinySeries:
    return TinySeries(cfg)
