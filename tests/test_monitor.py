"""The live monitor (garden.monitor): the offline pass's numbers during training, causal events, a stop,
its state for resuming, and clear errors before the first step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from garden.errors import GardenError
from garden.monitor import WeightMonitor

LIVE_AND_OFFLINE = {  # offline steps.csv column -> live key
    "msd": "diffusion/msd",
    "displacement": "diffusion/displacement",
    "bimodality_coefficient": "bimodality/bimodality_coefficient",
    "bimodal_unit_fraction": "units/bimodal_unit_fraction",
    "excess_kurtosis": "dist/excess_kurtosis",
}


def tiny_neox(vocab: int = 256, seed: int = 0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=32,
                           tie_word_embeddings=False)  # fmt: skip
    return GPTNeoXForCausalLM(config)


def train_and_watch(model, steps: int, monitor: WeightMonitor, save=None, decay: float = 0.85) -> list[int]:
    """A plain loop whose learning rate decays fast (the displacement falls below 5% of its peak within
    a few dozen steps); observes when `every` asks, saving a checkpoint there when `save` is given."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: decay**step)
    tokens = torch.randint(0, model.config.vocab_size, (64, 16), generator=torch.Generator().manual_seed(0))
    if save is not None:
        save(0)
    monitor.observe(0)
    for step in range(1, steps + 1):
        batch = tokens[(step * 8) % 64 : (step * 8) % 64 + 8]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if monitor.due(step):
            monitor.observe(step)
            if save is not None:
                save(step)
            if monitor.should_stop:
                return monitor.watched[0].history.steps
    return monitor.watched[0].history.steps


@pytest.mark.slow
def test_the_live_numbers_are_the_offline_pass_on_the_saved_checkpoints(tmp_path, compose_config):
    from garden.tasks import run

    model = tiny_neox()
    series = tmp_path / "series"
    monitor = WeightMonitor(model, ["unembedding"], every=3, log=False)
    observed = train_and_watch(
        model, 36, monitor, save=lambda step: model.save_pretrained(series / f"step{step}")
    )
    cfg = compose_config("model=local", f"model.path={series}", f"paths.data_dir={tmp_path}/data",
                         f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "progress=false")  # fmt: skip
    run(cfg, output_dir=tmp_path / "out")
    offline = pd.read_csv(tmp_path / "out" / "tables" / "steps.csv")
    history = monitor.watched[0].history
    live = pd.DataFrame({"step": history.steps, **history.values})
    assert list(offline["step"]) == observed == list(range(0, 37, 3))
    for column, key in LIVE_AND_OFFLINE.items():
        expected, found = offline[column].to_numpy(float), live[key].to_numpy(float)
        assert np.isnan(found[np.isnan(expected)]).all(), column
        assert found[~np.isnan(expected)] == pytest.approx(expected[~np.isnan(expected)], rel=1e-6), column
    # The quantiles are read off each step's own fine histogram: within a bin of the offline ones.
    width = 2 * 1.25 * offline[["min", "max"]].abs().to_numpy().max() / 65536
    assert np.abs(live["dist/q50"] - offline["q50"]).max() <= 2 * width
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["summary"]
    ended = monitor.summary()
    offline_step = lambda key: -1.0 if summary.get(key) is None else summary[key]  # noqa: E731  (null: not reached)
    assert ended["stationary_step"] == offline_step("stationary_step") != -1.0
    assert ended["unit_bifurcation_step"] == offline_step("unit_bifurcation_step")
    # The live event is declared from the past: after its offline date, at the patience-th observation.
    assert ended["live_stationary_declared_step"] >= ended["live_stationary_step"] >= 0


class Planted(torch.nn.Module):
    """One [rows, cols] weight whose values a test sets at each step."""

    def __init__(self, rows: int = 512, cols: int = 16):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(rows, cols))


def test_live_events_are_declared_from_the_past_only_and_dated_from_the_streaks_start():
    model = Planted()
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(512, 16, generator=gen) * 0.02
    signs = torch.where(torch.rand(512, 1, generator=gen) < 0.5, -1.0, 1.0)
    monitor = WeightMonitor(model, ["weight"], every=10, log=False, patience=3, stop_on="unit_bifurcation")
    stopped_at = None
    for step in range(0, 201, 10):
        # Steps shrink by half each observation (stationary soon); half of the units fork from step 60.
        drift = sum(0.5**k for k in range(step // 10)) * 0.01
        weight = base + drift
        if step >= 60:
            weight[:, :8] += signs * 0.2
        model.weight.data.copy_(weight)
        monitor.observe(step)
        if monitor.should_stop:
            stopped_at = step
            break
    forks = {e.name: e for e in monitor.events}
    assert forks["unit_bifurcation"].from_step == 60
    assert forks["unit_bifurcation"].declared_step == 80 == stopped_at == monitor.stopped_step
    assert "unit_bifurcation declared at step 80" in monitor.stop_reason
    assert monitor.summary()["stopped_step"] == 80
    history = monitor.watched[0].history.values
    assert history["units/bimodal_unit_fraction"][-1] == 0.5


def test_a_resumed_monitor_gives_the_numbers_and_events_of_an_uninterrupted_one():
    weights: dict[int, dict[str, torch.Tensor]] = {}
    model = tiny_neox()
    whole = WeightMonitor(model, every=2, log=False, patience=2, stop_on="stationary")
    observe = whole.observe

    def observe_and_keep(step: int):
        weights[step] = {k: v.clone() for k, v in model.state_dict().items()}
        return observe(step)

    whole.observe = observe_and_keep
    train_and_watch(model, 40, whole)
    assert whole.should_stop  # the run has an event to resume across

    def replay(monitor: WeightMonitor, steps) -> None:
        for step in steps:
            monitor.model.load_state_dict(weights[step])
            monitor.observe(step)

    steps = sorted(weights)
    first = WeightMonitor(tiny_neox(), every=2, log=False, patience=2, stop_on="stationary")
    replay(first, steps[:5])
    saved = first.state_dict()
    resumed = WeightMonitor(tiny_neox(seed=1), every=2, log=False, patience=2, stop_on="stationary")
    with pytest.raises(GardenError, match=r"resumed at step 8 does not hold the weights the monitor saw"):
        resumed.load_state_dict(saved)  # the checkpoint not loaded into the model
    resumed.model.load_state_dict(weights[steps[4]])  # a fresh process: the weights from the checkpoint,
    resumed.load_state_dict(saved)  # the rest from the monitor's state
    replay(resumed, steps[5:])
    found, expected = resumed.watched[0].history, whole.watched[0].history
    assert found.steps == expected.steps and found.values.keys() == expected.values.keys()
    for key, values in expected.values.items():
        np.testing.assert_array_equal(found.values[key], values, err_msg=key)  # NaN equal to NaN
    assert resumed.events == whole.events and resumed.stopped_step == whole.stopped_step
    assert resumed.snapshot_bytes == 2 * 256 * 32 * 4  # the reference and the previous step, float32


def test_bad_input_is_refused_before_the_first_step():
    model = tiny_neox()
    with pytest.raises(GardenError, match=r"monitor.every=0 is not valid; valid: an integer >= 1"):
        WeightMonitor(model, every=0)
    with pytest.raises(GardenError, match=r"monitor.stop_on='loss' is not valid; valid: one of stationary, "
                                          r"unit_bifurcation or null"):  # fmt: skip
        WeightMonitor(model, stop_on="loss")
    with pytest.raises(GardenError, match=r"monitor.patience=0 is not valid"):
        WeightMonitor(model, patience=0)
    with pytest.raises(
        GardenError,
        match=r"'nonsense' is neither a role \(unembedding, embedding, .*\) nor a "
        r"parameter of the model; its parameters: gpt_neox.embed_in.weight",
    ):
        WeightMonitor(model, ["nonsense"])
    with pytest.raises(GardenError, match=r"mlp_out is a block role; write mlp_out.<block>"):
        WeightMonitor(model, ["mlp_out"])
    with pytest.raises(GardenError, match=r"the model has 2 blocks; valid mlp_out.0..mlp_out.1"):
        WeightMonitor(model, ["mlp_out.5"])
    with pytest.raises(GardenError, match=r"is a role, but the model's family is unknown"):
        WeightMonitor(Planted(), ["unembedding"])


@pytest.mark.parametrize(
    "make, why",
    [
        (lambda: torch.nn.Parameter(torch.empty(8, 4, device="meta")), "is on the meta device"),
        (lambda: torch.nn.Parameter(torch.empty(0)), "is empty .*FSDP or DeepSpeed ZeRO-3"),
    ],
)
def test_a_parameter_the_monitor_cannot_read_whole_is_named_with_what_is_supported(make, why):
    model = Planted()
    model.weight = make()
    with pytest.raises(GardenError, match=rf"parameter 'weight' {why}.*supported are one process and DDP"):
        WeightMonitor(model, ["weight"])


def test_a_sharded_dtensor_parameter_is_refused(tmp_path):
    import torch.distributed as dist
    from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = Planted()
        mesh = DeviceMesh("cpu", [0])
        model.weight = torch.nn.Parameter(distribute_tensor(torch.zeros(512, 16), mesh, [Shard(0)]))
        with pytest.raises(GardenError, match=r"parameter 'weight' is sharded \(DTensor\)"):
            WeightMonitor(model, ["weight"], log=False)
    finally:
        dist.destroy_process_group()


def test_the_offline_definitions_on_the_history_look_at_the_whole_series():
    model = Planted()
    monitor = WeightMonitor(model, ["weight"], every=1, log=False, unit_axis=None, patience=2)
    # D by step: -, 1, 1, 0.01, 0.01, 1, 0.01, 0.01, 0.01: the live rule declares at step 4 (from 3); the
    # offline streak that lasts to the end starts at step 6.
    position = torch.zeros(512, 16)
    for step, size in enumerate([0, 1, 1, 0.1, 0.1, 1, 0.1, 0.1, 0.1]):
        position += size * torch.linspace(-1, 1, 512 * 16).reshape(512, 16)
        model.weight.data.copy_(position)
        monitor.observe(step)
    summary = monitor.summary()
    assert summary["live_stationary_step"] == 3 and summary["live_stationary_declared_step"] == 4
    assert summary["stationary_step"] == 6
    assert math.isnan(monitor.watched[0].history.values["diffusion/displacement"][0])


def _ddp_worker(rank: int, store: str, out: str) -> None:
    """One rank of a 2-process DDP training (gloo, CPU) with a monitor on every rank."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        model = DistributedDataParallel(tiny_neox())
        monitor = WeightMonitor(model, every=2, log=False, patience=2, stop_on="stationary")
        seen = []
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.8**step)
        monitor.observe(0)
        for step in range(1, 60):
            batch = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(step * 2 + rank))
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            if monitor.due(step):
                seen.append(bool(monitor.observe(step)))
                if monitor.should_stop:
                    break
        result = {"step": step, "computed": seen, "stopped_step": monitor.stopped_step,
                  "history": monitor.watched[0].history.steps}  # fmt: skip
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_under_ddp_rank_0_computes_and_every_rank_stops_at_its_step(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    first, second = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert all(first["computed"]) and not any(second["computed"]) and second["history"] == []
    assert first["stopped_step"] == second["stopped_step"] == first["step"] == second["step"] < 59
