"""`GardenCallback` for the Hugging Face `Trainer`: the live monitor at `state.global_step` (the optimizer
step: `on_step_end` runs once per optimizer step, whatever the gradient accumulation), a stop through
`control.should_training_stop`, and its state saved in every checkpoint folder (`garden_monitor.pt`
beside the weights) so that `trainer.train(resume_from_checkpoint=...)` goes on with the same numbers."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import TrainerCallback

from garden.errors import GardenError
from garden.monitor import WeightMonitor

log = logging.getLogger("garden")
STATE_FILE = "garden_monitor.pt"


class GardenCallback(TrainerCallback):
    """Watch `layers` every `every` optimizer steps (step 0, before training, is the MSD's reference); the
    keyword settings are `WeightMonitor`'s (`stop_on`, `min_step`, `patience`, thresholds, `log`).
    `resume_from` names the checkpoint folder to resume the monitor from when it is not the output_dir's
    `checkpoint-{global_step}`. The monitor and its summary stay readable after training
    (`callback.monitor`, `callback.summary`)."""

    def __init__(self, layers=("unembedding",), every: int = 20, resume_from: str | Path | None = None,
                 **settings) -> None:  # fmt: skip
        self.layers, self.every, self.settings = layers, every, settings
        self.resume_from = None if resume_from is None else Path(resume_from)
        self.monitor: WeightMonitor | None = None
        self.summary: dict[str, float] | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.monitor = WeightMonitor(model, self.layers, self.every, **self.settings)
        if state.global_step > 0:
            try:
                self.monitor.load_state_dict(self._saved_state(args, state.global_step), state.global_step)
            except GardenError as error:
                raise GardenError(
                    f"{error} (transformers 5's Trainer resumes GPT-NeoX without its `embed_out`, stored as "
                    "`lm_head` in memory: pass Trainer(model=AutoModelForCausalLM.from_pretrained(<the "
                    "checkpoint folder>)) so the weights are loaded with their names converted)"
                ) from error
        else:
            self.monitor.observe(0)
        return control

    def _saved_state(self, args, step: int) -> dict:
        folder = self.resume_from or Path(args.output_dir) / f"checkpoint-{step}"
        path = folder / STATE_FILE
        if not path.is_file():
            raise GardenError(
                f"the training resumes at step {step}, but {path} is missing: GardenCallback saves the "
                "monitor's state in each checkpoint folder; pass GardenCallback(resume_from=<that folder>)"
            )
        return torch.load(path, map_location="cpu", weights_only=False)

    def on_step_end(self, args, state, control, **kwargs):
        monitor = self.monitor
        if monitor.due(state.global_step):
            monitor.observe(state.global_step)
            if monitor.should_stop and not control.should_training_stop:
                control.should_training_stop = True
                control.should_save = True  # the stopped model is the run's last checkpoint
        return control

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                torch.save(self.monitor.state_dict(), folder / STATE_FILE)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.summary = self.monitor.close()
        return control
