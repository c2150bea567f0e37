"""The local source: every Hugging Face layout, one tensor per step, and errors that name path and step."""

import time

import pytest
import torch

from conftest import neox_state, random_walk, write_series
from garden import families
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
    with pytest.raises(GardenError, match=r"holds no checkpoint folders \(e.g. step0/"):
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
    from garden.settings import LayerSettings, read_section

    block = {"name": "mlp_out", "role": "mlp_out", "index": 1, "tensor": None}

    def layer(**changes) -> LayerSettings:
        return read_section(LayerSettings, {**block, **changes}, "layer.")

    neox = families.get("gpt_neox")
    resolved = resolve_layer(layer(), neox, 2)
    assert resolved.tensor == "gpt_neox.layers.1.mlp.dense_4h_to_h.weight"
    assert resolve_layer(layer(index=-1), neox, 2).label == "mlp_out.1"
    with pytest.raises(GardenError, match=r"layer.index=2 is out of range.*valid layer.index is 0..1"):
        resolve_layer(layer(index=2), neox, 2)
    exact = resolve_layer(layer(tensor="W_V"), None, None)
    assert (exact.tensor, exact.label) == ("W_V", "W_V")
    with pytest.raises(GardenError, match=r"layer=mlp_out needs the model family.*gpt_neox.*olmo2"):
        resolve_layer(layer(), None, 2)
    with pytest.raises(GardenError, match=r"layer.role='mlp_gate' is not valid; valid: one of unembedding"):
        layer(role="mlp_gate")


def test_the_prefetcher_reads_ahead_in_order_and_holds_at_most_depth_tensors():
    import threading

    from garden.series import Prefetcher

    started: list[int] = []
    held = []
    gate = threading.Event()

    def read(step: int) -> torch.Tensor:
        started.append(step)
        gate.wait(5)
        if step == 13:
            raise GardenError("step 13: broken")
        return torch.full((2,), float(step))

    order = [0, 1, 2, 3, 4, 5, 13, 6]
    with Prefetcher(read, order, depth=2) as reads:
        time.sleep(0.1)
        assert sorted(started) == [0, 1]  # two ahead, no more, before anything is asked for
        gate.set()
        held.append(reads.get(0))
        assert reads.get(1)[0] == 1
        assert reads.get(4)[0] == 4  # the pass skipped 2 and 3: their reads are dropped
        assert reads.get(9)[0] == 9  # never planned: read at once
        assert reads.get(5)[0] == 5
        with pytest.raises(GardenError, match="step 13: broken"):  # errors surface where the step is read
            reads.get(13)
        assert reads.get(6)[0] == 6
    assert started.count(9) == 1 and 3 not in started[started.index(4) :]
    assert Prefetcher(read, order, depth=0).get(3)[0] == 3  # depth 0: plain reads


def test_a_legacy_bin_checkpoint_is_read_without_mapping(tmp_path):
    state = neox_state(torch.arange(32 * 8, dtype=torch.float32).reshape(32, 8).half())
    (tmp_path / "step0").mkdir()
    torch.save(state, tmp_path / "step0" / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert torch.equal(LocalSeries(tmp_path).read_tensor(0, "embed_out.weight"), state["embed_out.weight"])


def test_a_new_source_is_one_registered_function(tmp_path, compose_config, monkeypatch):
    """`model.source=<name>` dispatches through the registry: an in-memory series registered in one line
    runs end to end like the built-in sources (family detected from its tensor names)."""
    from conftest import ArraySeries, planted_fork
    from garden import sources
    from garden.tasks import run

    values = planted_fork([0, 1, 2, 4, 8], onset=2, n=16 * 100)
    memory = ArraySeries({s: neox_state(v.reshape(100, 16), d=16) for s, v in values.items()})
    monkeypatch.setitem(sources.SOURCES, "memory", sources.Source("memory", lambda cfg: memory))
    where = [
        f"paths.data_dir={tmp_path}/data",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        "progress=false",
    ]
    cfg = compose_config("model=local", "model.source=memory", "metrics=minimal", *where)
    outcome = run(cfg, output_dir=tmp_path / "out")
    assert outcome.tags["garden.series"] == memory.identity and outcome.tags["garden.family"] == "gpt_neox"
    assert list(outcome.trajectory.steps) == [0, 1, 2, 4, 8]
    with pytest.raises(GardenError, match=r"model.source='nowhere' is not valid; valid: .*memory"):
        run(compose_config("model=local", "model.source=nowhere", *where), output_dir=tmp_path / "o2")


# ------------------------------------------- content ids: from the copy the pass holds, quick probes


@pytest.mark.parametrize("layout", ["safetensors", "bin", "sharded_safetensors"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_id_of_a_tensor_as_read_is_its_content_id(tmp_path, layout, dtype):
    from garden.series import LocalSeries

    state = {"a.weight": torch.randn(40, 24).to(dtype), "b.weight": torch.randn(7).to(dtype)}
    series = LocalSeries(write_series(tmp_path / "s", {0: state}, layout))
    fresh = LocalSeries(tmp_path / "s")  # its own memo: nothing remembered
    for name in state:
        assert fresh.fingerprint_of(0, name, series.read_tensor(0, name)) == series.fingerprint(0, name)


def test_a_first_extraction_hashes_from_the_files_only_its_reference_and_final_steps(tmp_path, monkeypatch):
    """Duplicates are looked for with quick ids (three spans of each tensor), and every other step's
    content id is hashed from the copy the pass reads: no step's bytes are read twice."""
    from garden import formats
    from garden import series as series_module
    from garden.extract import ExtractionPlan, extract
    from garden.series import LocalSeries, find_duplicates

    steps = [0, 1, 2, 4, 8, 16]
    walk = random_walk(steps, (64, 32), 1e-4)
    root = write_series(tmp_path / "s", {s: {"w": walk[s]} for s in steps})
    hashed: list[int] = []
    original = formats.tensor_content_id

    def counting(files, tensor):
        hashed.append(files.step)
        return original(files, tensor)

    monkeypatch.setattr(series_module, "tensor_content_id", counting)
    series = LocalSeries(root)
    assert find_duplicates(series, steps, "w") == {}
    plan = ExtractionPlan(tensor="w", steps=tuple(steps), reference_step=0, n_distribution_sample=64,
                          unit_sample=16)  # fmt: skip
    extract(series, plan, tmp_path / "cache", progress=False)
    assert sorted(hashed) == [0, 16]
    again = LocalSeries(root)  # a second job: every record checked against ids hashed from the files
    hashed.clear()
    extract(again, plan, tmp_path / "cache", progress=False)
    assert sorted(hashed) == steps


def test_quick_ids_find_duplicates_and_never_take_a_different_tensor_for_one(tmp_path):
    from garden.formats import QUICK_SPAN
    from garden.series import LocalSeries, find_duplicates

    n = 4 * QUICK_SPAN // 4  # float32 entries: spans at the start, middle and end leave bytes between
    base = torch.randn(n)
    between = base.clone()
    between[n * 5 // 16] += 1.0  # bytes between the first and middle spans: the same quick id, not content
    steps = {0: base, 1: base.clone(), 2: between, 3: between.clone()}
    series = LocalSeries(write_series(tmp_path / "s", {s: {"w": v} for s, v in steps.items()}))
    assert series.quick_id(2, "w") == series.quick_id(0, "w")
    assert series.content_id(2, "w") != series.content_id(0, "w")
    assert find_duplicates(series, [0, 1, 2, 3], "w") == {1: 0, 3: 2}
