"""The monitor in real trainers: `transformers.Trainer` and `lightning.Trainer` on a tiny GPT-NeoX (CPU, a few
dozen steps): numbers at the optimizer steps, logged under the offline keys, a stop when told, and a resumed
training that gives the numbers and events of an uninterrupted one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_monitor import tiny_neox

pytestmark = pytest.mark.slow

TOKENS = torch.randint(0, 256, (64, 16), generator=torch.Generator().manual_seed(0))


def assert_same_history(found, expected) -> None:
    assert found.steps == expected.steps and found.values.keys() == expected.values.keys()
    for key, values in expected.values.items():
        np.testing.assert_allclose(found.values[key], values, rtol=1e-6, err_msg=key)  # NaN equal to NaN


def mlflow_run(tracking_uri: str, run_id: str | None = None):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    if run_id is None:
        (run,) = client.search_runs(client.get_experiment_by_name("hf").experiment_id)
        run_id = run.info.run_id
    return client, client.get_run(run_id)


# ------------------------------------------------------------------------------ Hugging Face Trainer


def hf_trainer(output_dir, callbacks, max_steps: int, model=None, **arguments):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(str(output_dir), max_steps=max_steps, learning_rate=2e-2, report_to=[],
                             per_device_train_batch_size=4, use_cpu=True, seed=0, disable_tqdm=True,
                             lr_scheduler_type="cosine", save_steps=4, **arguments)  # fmt: skip
    data = [{"input_ids": ids, "labels": ids} for ids in TOKENS]
    return Trainer(model=model or tiny_neox(), args=args, train_dataset=data, callbacks=callbacks)


def test_the_trainer_callback_observes_optimizer_steps_logs_offline_keys_and_stops(tmp_path, monkeypatch):
    import mlflow

    from garden.integrations.transformers import GardenCallback

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)  # the process's store and experiment, as a training script sets them
    mlflow.set_experiment("hf")
    callback = GardenCallback(every=2, stop_on="stationary", patience=2)
    trainer = hf_trainer(tmp_path / "out", [callback], max_steps=60, gradient_accumulation_steps=2)
    trainer.train()
    monitor = callback.monitor
    steps = monitor.watched[0].history.steps
    assert steps == list(range(0, monitor.stopped_step + 1, 2))  # optimizer steps: accumulation counted once
    assert trainer.state.global_step == monitor.stopped_step < 60  # stopped early, when told
    assert (tmp_path / "out" / f"checkpoint-{monitor.stopped_step}" / "garden_monitor.pt").is_file()
    client, run = mlflow_run(uri)  # the run the monitor opened (none was active), ended
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "diffusion/msd")
    assert [m.step for m in history] == steps
    assert [m.value for m in history] == pytest.approx(monitor.watched[0].history.values["diffusion/msd"])
    for key in ("units/bimodal_unit_fraction", "bimodality/bimodality_coefficient", "monitor/seconds"):
        assert key in run.data.metrics
    assert run.data.metrics["summary/stopped_step"] == monitor.stopped_step
    assert run.data.tags["garden.stop_reason"].startswith(
        f"stationary declared at step {monitor.stopped_step}"
    )


def test_a_resumed_trainer_gives_the_numbers_and_events_of_an_uninterrupted_one(tmp_path):
    from transformers import AutoModelForCausalLM, TrainerCallback

    from garden.errors import GardenError
    from garden.integrations.transformers import GardenCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 12
            return control

    settings = dict(every=2, stop_on="stationary", patience=2, log=False)
    whole = GardenCallback(**settings)
    hf_trainer(tmp_path / "whole", [whole], max_steps=40).train()
    assert whole.monitor.should_stop and whole.monitor.stopped_step > 12  # an event after the resume

    interrupted = GardenCallback(**settings)
    hf_trainer(tmp_path / "parts", [interrupted, StopAt()], max_steps=40).train()
    checkpoint = tmp_path / "parts" / "checkpoint-12"
    # transformers 5's resume loads GPT-NeoX's state dict without converting `embed_out` to `lm_head`: the
    # monitor sees the unembedding is not the one of step 12, and says how to load it.
    with pytest.raises(GardenError, match=r"embed_out.weight differs from its snapshot.*from_pretrained"):
        hf_trainer(tmp_path / "parts", [GardenCallback(**settings)], max_steps=40).train(str(checkpoint))
    resumed = GardenCallback(**settings)
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    trainer = hf_trainer(tmp_path / "parts", [resumed], max_steps=40, model=model)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert_same_history(resumed.monitor.watched[0].history, whole.monitor.watched[0].history)
    assert resumed.monitor.events == whole.monitor.events
    assert resumed.monitor.stopped_step == whole.monitor.stopped_step == trainer.state.global_step


# ------------------------------------------------------------------------------------------ Lightning


def lightning_module(decay: float = 0.9):
    import lightning as L

    class NeoX(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_neox()

        def training_step(self, batch, batch_idx):
            # The batch follows the optimizer step, not the loader: a resume at an epoch's end re-enters that
            # epoch for one batch (Lightning's loop with a plain DataLoader), which is not under test here.
            start = (self.global_step * 8) % len(TOKENS)
            window = TOKENS[start : start + 8]
            return self.model(input_ids=window, labels=window).loss

        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=2e-2)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: decay**step)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    return NeoX()


def lightning_fit(callbacks, folder, ckpt_path=None, logger=False, **limits):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0, verbose=False)
    saving = ModelCheckpoint(dirpath=folder, every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=logger, callbacks=[*callbacks, saving],
                        enable_progress_bar=False, enable_model_summary=False, **limits)  # fmt: skip
    data = torch.utils.data.DataLoader(TOKENS, batch_size=8, shuffle=False)
    trainer.fit(lightning_module(), data, ckpt_path=ckpt_path)
    return trainer


def test_the_lightning_callback_logs_into_the_mlflow_logger_run_and_stops(tmp_path):
    from lightning.pytorch.loggers import MLFlowLogger

    from garden.integrations.lightning import GardenCallback

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    logger = MLFlowLogger(experiment_name="lightning", tracking_uri=uri)
    callback = GardenCallback(every=2, stop_on="stationary", patience=2)
    trainer = lightning_fit([callback], tmp_path / "ckpt", logger=logger, max_steps=200)
    monitor = callback.monitor
    assert monitor.should_stop and trainer.global_step == monitor.stopped_step < 200
    client, run = mlflow_run(uri, logger.run_id)
    history = client.get_metric_history(run.info.run_id, "diffusion/msd")
    assert (
        [m.step for m in history]
        == monitor.watched[0].history.steps
        == list(range(0, trainer.global_step + 1, 2))
    )
    assert run.data.metrics["summary/stopped_step"] == monitor.stopped_step
    assert "garden.stop_reason" in run.data.tags


def test_a_resumed_lightning_fit_gives_the_numbers_and_events_of_an_uninterrupted_one(tmp_path):
    from garden.integrations.lightning import GardenCallback

    settings = dict(every=2, stop_on="stationary", patience=2, log=False)
    whole = GardenCallback(**settings)
    lightning_fit([whole], tmp_path / "whole", max_steps=80)
    assert whole.monitor.should_stop and whole.monitor.stopped_step > 8

    first = GardenCallback(**settings)
    # 8 steps (an epoch), then the checkpoint of the finished fit.
    checkpoint = tmp_path / "parts.ckpt"
    lightning_fit([first], tmp_path / "parts", max_epochs=1).save_checkpoint(checkpoint)
    resumed = GardenCallback(**settings)
    trainer = lightning_fit([resumed], tmp_path / "resumed", ckpt_path=checkpoint, max_steps=80)
    assert_same_history(resumed.monitor.watched[0].history, whole.monitor.watched[0].history)
    assert resumed.monitor.events == whole.monitor.events
    assert resumed.monitor.stopped_step == whole.monitor.stopped_step == trainer.global_step
