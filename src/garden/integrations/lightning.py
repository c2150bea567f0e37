"""`GardenCallback` for Lightning (`pip install garden[lightning]`): the live monitor at
`trainer.global_step` (optimizer steps), a stop through `trainer.should_stop`, and its state in
Lightning's checkpoint (`Callback.state_dict`), so that `trainer.fit(..., ckpt_path=...)` goes on with the
same numbers. With an `MLFlowLogger` the monitor logs into that logger's run."""

from __future__ import annotations

from lightning.pytorch import Callback

from garden.monitor import MlflowSink, WeightMonitor


class GardenCallback(Callback):
    """Watch `layers` of the LightningModule (a transformers model inside it is found through its
    `config.model_type`) every `every` optimizer steps; keyword settings as `WeightMonitor`'s."""

    def __init__(self, layers=("unembedding",), every: int = 20, **settings) -> None:
        self.layers, self.every, self.settings = layers, every, settings
        self.monitor: WeightMonitor | None = None
        self.summary: dict[str, float] | None = None
        self._saved: dict | None = None

    @property
    def state_key(self) -> str:
        return f"GardenCallback{{layers={list(self.layers)}, every={self.every}}}"

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or self.monitor is not None:
            return
        self.monitor = WeightMonitor(pl_module, self.layers, self.every, sink=self._sink(trainer),
                                     **self.settings)  # fmt: skip

    def _sink(self, trainer) -> MlflowSink | None:
        """The MLFlowLogger's run when the trainer has one, else the monitor's own choice."""
        if not self.settings.get("log", True) or trainer.global_rank != 0:
            return None
        for logger in trainer.loggers:
            if type(logger).__name__ == "MLFlowLogger":
                return MlflowSink(run_id=logger.run_id, tracking_uri=logger._tracking_uri)
        return None

    def on_train_start(self, trainer, pl_module) -> None:
        if self._saved is not None:
            self.monitor.load_state_dict(self._saved, trainer.global_step)
            self._saved = None
        elif trainer.global_step == 0 and self.monitor.last_step is None:
            self.monitor.observe(0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        monitor = self.monitor
        if monitor.due(trainer.global_step):
            monitor.observe(trainer.global_step)
            if monitor.should_stop:
                trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        self.summary = self.monitor.close()

    def state_dict(self) -> dict:
        return {} if self.monitor is None else self.monitor.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            self._saved = state_dict
