"""`model.source=tiny`: the small GPT-NeoX series garden trains itself (garden.tiny), as a lazy series:
its steps, tensor names, shapes and config are known from the config, and it trains on the first read."""

from __future__ import annotations

import logging
import threading
from functools import cached_property
from pathlib import Path

from garden import cache
from garden.families import Revision
from garden.series import TRAIN_LOG, LocalSeries
from garden.settings import Settings
from garden.sources.registry import CONTENT_IDS, register

log = logging.getLogger("garden")


class TinySeries(LocalSeries):
    """The tiny series' folder, trained (or resumed, or waited for while another job trains it) the first
    time anything needs its files; what the config already says is answered without training."""

    def __init__(self, settings: Settings):
        from garden.tiny import tiny_series_dir

        self.settings = settings
        self.data_dir = Path(settings.paths.data_dir)
        folder = tiny_series_dir(settings.model, settings.corpus, self.data_dir, settings.variant,
                                 settings.metrics)  # fmt: skip
        super().__init__(folder, label="tiny", memo_dir=self.data_dir / CONTENT_IDS, must_exist=False)
        self._training = threading.Lock()

    def prepare(self) -> None:
        from garden.tiny import COMPLETE_MARKER, checkpoint_steps, ensure_tiny_series

        settings = self.settings
        model, corpus = settings.model, settings.corpus
        if not (self.root / COMPLETE_MARKER).is_file():  # say what is trained, and where, before the bar
            arch = model.architecture
            log.info(
                "the tiny series is not trained yet: a GPT-NeoX of %d blocks, d_model %d, %d heads, vocab "
                "%d, %d steps on %s (%s), %d checkpoints, on %s, into %s",
                arch["num_hidden_layers"], arch["hidden_size"], arch["num_attention_heads"],
                arch["vocab_size"], model.train.steps, corpus.path or corpus.name, settings.variant,
                len(checkpoint_steps(model.train)), settings.torch_device, self.root,
            )  # fmt: skip
        with self._training:
            ensure_tiny_series(model, corpus, self.data_dir, settings.torch_device, settings.progress,
                               settings.variant, settings.metrics)  # fmt: skip

    @cached_property
    def revisions(self) -> dict[int, Revision]:
        self.prepare()
        return super().revisions

    def steps(self) -> list[int]:
        """The schedule (a training with a stop rule: the checkpoints it wrote, once trained; the job
        plans on the schedule and plans again after the training)."""
        from garden.tiny import series_steps

        return series_steps(self.settings.model.train, self._completion())

    def _completion(self) -> dict | None:
        """The completion marker (series.json) of a trained series; None before."""
        from garden.tiny import COMPLETE_MARKER

        return cache.read_json(self.root / COMPLETE_MARKER, "tiny series marker")

    def tensor_names(self, step: int) -> list[str]:
        from garden.tiny import tensor_names_on_disk

        return tensor_names_on_disk(self.settings.model)

    def tensor_shape(self, step: int, name: str) -> tuple[int, ...] | None:
        from garden.tiny import tensor_shapes_on_disk

        return tensor_shapes_on_disk(self.settings.model).get(name)

    def model_config(self) -> dict | None:
        from garden.tiny import neox_config

        return neox_config(self.settings.model).to_dict()

    def training_monitor(self) -> dict | None:
        return (self._completion() or {}).get("monitor")

    def artifacts(self) -> list[Path]:
        from garden.tiny import COMPLETE_MARKER

        return [self.root / TRAIN_LOG, self.root / COMPLETE_MARKER]


@register("tiny", caches=("tiny",))
def open_tiny(settings: Settings) -> TinySeries:
    return TinySeries(settings)
