"""The local source: every Hugging Face layout, one tensor per step, and errors that name path and step."""

import pytest
import torch

from conftest import neox_state, write_series
from garden.errors import GardenError
from garden.layers import resolve_layer
from garden.series import LocalSeries

LAYOUTS = ["safetensors", "sharded_safetensors", "bin", "sharded_bin"]


def small_series(root, layout="safetensors", steps=(0, 1, 2), dtype=torch.float16):
    tensors = {
        s: neox_state((torch.arange(32 * 8, dtype=torch.float32).reshape(32, 8) * (s + 1)).to(dtype))
        for s in steps
    }
    return write_series(root, tensors, layout, config={"num_hidden_layers": 2})


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_reads_the_same_tensor(tmp_path, layout):
    series = LocalSeries(small_series(tmp_path / layout, layout))
    assert series.steps() == [0, 1, 2]
    tensor = series.read_tensor(2, "embed_out.weight")
    assert tensor.dtype == torch.float16
    torch.testing.assert_close(tensor.float(), torch.arange(256.0).reshape(32, 8) * 3)
    assert "gpt_neox.layers.1.mlp.dense_4h_to_h.weight" in series.tensor_names(0)
    assert series.num_layers(0) == 2


def test_block_count_from_tensor_names_without_config(tmp_path):
    root = small_series(tmp_path / "s")
    (root / "config.json").unlink()
    assert LocalSeries(root).num_layers(0) == 2


def test_fingerprint_changes_with_the_file(tmp_path):
    root = small_series(tmp_path / "s")
    series = LocalSeries(root)
    before = series.fingerprint(1, "embed_out.weight")
    write_series(root, {1: neox_state(torch.zeros(32, 8))})
    assert series.fingerprint(1, "embed_out.weight") != before


def test_missing_tensor_lists_what_the_checkpoint_has(tmp_path):
    series = LocalSeries(small_series(tmp_path / "s"))
    with pytest.raises(
        GardenError, match=r"step 1: the checkpoint has no tensor 'nope'.*\n.*embed_out.weight"
    ):
        series.read_tensor(1, "nope")


def test_bad_paths_and_files_name_the_path_and_step(tmp_path):
    with pytest.raises(GardenError, match="is not a directory"):
        LocalSeries(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GardenError, match=r"holds no step\{N\}/ folders"):
        LocalSeries(tmp_path / "empty").steps()
    root = small_series(tmp_path / "s")
    (root / "step3").mkdir()
    with pytest.raises(GardenError, match=r"step 3: no weights in .*step3"):
        LocalSeries(root).read_tensor(3, "embed_out.weight")
    (root / "step3").rmdir()
    (root / "step2" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(GardenError, match=r"step 2: cannot read .*step2/model.safetensors"):
        LocalSeries(root).read_tensor(2, "embed_out.weight")


def test_corrupt_bin_names_the_step(tmp_path):
    root = small_series(tmp_path / "b", "bin")
    (root / "step1" / "pytorch_model.bin").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(GardenError, match=r"step 1: cannot read .*pytorch_model.bin"):
        LocalSeries(root).read_tensor(1, "embed_out.weight")


def test_layer_resolution_and_index_range():
    block = {
        "name": "mlp_out",
        "pattern": "gpt_neox.layers.{index}.mlp.dense_4h_to_h.weight",
        "index": 1,
        "tensor": None,
    }
    from omegaconf import OmegaConf

    assert resolve_layer(OmegaConf.create(block), 2).tensor == "gpt_neox.layers.1.mlp.dense_4h_to_h.weight"
    assert resolve_layer(OmegaConf.create({**block, "index": -1}), 2).label == "mlp_out.1"
    with pytest.raises(GardenError, match=r"layer.index=2 is out of range.*valid layer.index is 0..1"):
        resolve_layer(OmegaConf.create({**block, "index": 2}), 2)
    exact = resolve_layer(OmegaConf.create({**block, "tensor": "W_V"}), None)
    assert (exact.tensor, exact.label) == ("W_V", "W_V")
