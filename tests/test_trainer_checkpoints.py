"""`model=local` on the `output_dir` a Hugging Face `Trainer` writes (`checkpoint-{N}/` folders, with the
optimizer, scheduler and trainer state beside the weights), read without any extra setting."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from garden.errors import GardenError
from garden.families import FAMILIES, parse_revisions


def test_trainer_folders_are_steps_beside_the_family_names_and_never_two_for_one_step():
    names = ["checkpoint-500", "checkpoint-1000", "runs", "checkpoint-last", "step0"]
    found = parse_revisions(names, FAMILIES["gpt_neox"], None, "model.path out", trainer_folders=True)
    assert {step: r.name for step, r in found.items()} == {0: "step0", 500: "checkpoint-500",
                                                           1000: "checkpoint-1000"}  # fmt: skip
    assert parse_revisions(names, None, None, "hub repo") == {0: found[0]}  # only a local folder's layout
    picked = parse_revisions(names, None, r"step(?P<step>\d+)", "model.path out", trainer_folders=True)
    assert list(picked) == [0]  # model.revision_pattern says which names are the series
    with pytest.raises(GardenError, match="'checkpoint-500' and 'step500' are both step 500"):
        parse_revisions(["step500", "checkpoint-500"], None, None, "model.path out", trainer_folders=True)


def train_with_the_trainer(output_dir: Path, steps: int, save_every: int) -> None:
    """A tiny GPT-NeoX trained by `transformers.Trainer`, on CPU, saving every `save_every` steps."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=32)  # fmt: skip
    tokens = torch.randint(0, 64, (64, 16), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(str(output_dir), max_steps=steps, save_steps=save_every, learning_rate=1e-2,
                             per_device_train_batch_size=8, report_to=[], use_cpu=True, seed=0,
                             disable_tqdm=True)  # fmt: skip
    data = [{"input_ids": ids, "labels": ids} for ids in tokens]
    Trainer(model=GPTNeoXForCausalLM(config), args=args, train_dataset=data).train()


@pytest.mark.slow
def test_a_trainer_output_dir_is_a_series_with_no_extra_setting(tmp_path, compose_config):
    from garden.tasks import run

    output_dir = tmp_path / "trainer"
    train_with_the_trainer(output_dir, steps=16, save_every=2)
    assert (output_dir / "checkpoint-2" / "optimizer.pt").is_file()  # what garden must not take for weights
    cfg = compose_config("model=local", f"model.path={output_dir}", f"paths.data_dir={tmp_path}/data",
                         f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "progress=false")  # fmt: skip
    run(cfg, output_dir=tmp_path / "out")
    steps = pd.read_csv(tmp_path / "out" / "tables" / "steps.csv")
    assert list(steps["step"]) == list(range(2, 17, 2))  # the optimizer steps the Trainer saved at
    weights = {s: load_file(output_dir / f"checkpoint-{s}" / "model.safetensors")["embed_out.weight"]
               for s in steps["step"]}  # fmt: skip
    expected = [float(((weights[s].double() - weights[2].double()) ** 2).mean()) for s in steps["step"]]
    assert steps["msd"].tolist() == pytest.approx(expected, rel=1e-6)


def test_an_empty_output_dir_names_the_layouts_garden_reads(tmp_path):
    from garden.series import LocalSeries

    (tmp_path / "runs").mkdir()
    with pytest.raises(GardenError, match=r"holds no checkpoint folders .*a Trainer's checkpoint-500/"):
        LocalSeries(tmp_path).steps()
