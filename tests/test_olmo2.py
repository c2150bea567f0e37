"""OLMo-2 as garden's second model family: a tiny random-init `Olmo2ForCausalLM` series (grouped-query
attention, branches named as OLMo-2 names them, one branch serving an earlier one's bytes) read from disk
and from the fake Hub, with every role and every evaluation stage."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from transformers import Olmo2Config, Olmo2ForCausalLM

from fakehub import FakeHub
from garden import families
from garden.errors import GardenError
from garden.evaluation.stability import ov_singular_values, proportional_effective_rank
from garden.layers import resolve_layer
from garden.series import DerivedTensors, LocalSeries
from garden.tasks import run

REPO = "allenai-test/OLMo-2-tiny"
STEPS = [0, 1000, 2000, 3000, 4000, 5000, 6000, 7000]
DUPLICATED = {6000: 5000}  # the stage-1 branch of step 6000 serves step 5000's files (allenai/OLMo#915)
HEADS, KV_HEADS, LAYERS = 4, 2, 2


def branch(step: int) -> str:
    """OLMo-2's names: 4B tokens per 1000 steps; one branch published without the `stage1-` prefix."""
    name = f"step{step}-tokens{step * 4 // 1000}B"
    return name if step == 3000 else f"stage1-{name}"


@pytest.fixture(scope="module")
def olmo2_hub_root(tmp_path_factory, small_corpus) -> Path:
    """<root>/<org>/<name>/<branch>/ folders: the fake Hub's layout, and a series on disk as it is."""
    from garden.tiny import train_tokenizer

    texts = [line for path in sorted(small_corpus.glob("*.txt")) for line in path.read_text().splitlines()]
    tokenizer = train_tokenizer(texts, 300)
    config = Olmo2Config(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, intermediate_size=64,
                         max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = Olmo2ForCausalLM(config)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    root = tmp_path_factory.mktemp("olmo2-hub")
    series = root / REPO
    previous = 0
    for step in STEPS:
        folder = series / branch(step)
        if step in DUPLICATED:
            shutil.copytree(series / branch(DUPLICATED[step]), folder)
            continue
        for name, value in state.items():  # a random walk: the weights move with the steps
            if value.is_floating_point() and not name.endswith("norm.weight"):
                value += torch.randn(value.shape, generator=gen) * 0.002 * ((step - previous) / 1000) ** 0.5
        model.load_state_dict(state)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        previous = step
    # Not this series: a mid-training continuation (its own step count) and the main branch.
    shutil.copytree(series / branch(7000), series / "stage2-ingredient1-step1000-tokens5B")
    shutil.copytree(series / branch(7000), series / "main")
    return root


@pytest.fixture(scope="module")
def olmo2_series(olmo2_hub_root) -> Path:
    return olmo2_hub_root / REPO


def test_revision_names_parse_into_steps_and_tokens():
    olmo2 = families.get("olmo2")
    assert olmo2.parse_revision("stage1-step101000-tokens424B") == families.Revision(
        "stage1-step101000-tokens424B", 101000, 424 * 10**9
    )
    assert olmo2.parse_revision("step150-tokens1B").step == 150
    assert olmo2.parse_revision("stage2-ingredient1-step1000-tokens5B") is None
    assert olmo2.parse_revision("main") is None
    ingredient = r"stage2-ingredient1-step(?P<step>\d+)-tokens(?P<tokens>\d+)B"
    assert olmo2.parse_revision("stage2-ingredient1-step1000-tokens5B", ingredient).step == 1000
    assert families.get("gpt_neox").parse_revision("step143000").step == 143000
    with pytest.raises(GardenError, match=r"'stage1-step5-tokens1B' and 'step5-tokens1B' are both step 5"):
        families.parse_revisions(["stage1-step5-tokens1B", "step5-tokens1B"], olmo2, None, "repo")


def test_gqa_ov_circuits_match_the_explicit_product():
    """Query head h reads its key/value group's W_V: W_O[:, h] @ W_V[h // (heads / kv_heads)]."""
    torch.manual_seed(3)
    config = Olmo2Config(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=8,
                         num_key_value_heads=2, intermediate_size=64)  # fmt: skip
    block = Olmo2ForCausalLM(config).model.layers[0]
    fast = ov_singular_values(families.get("olmo2").ov_circuits(block, config))
    w_o, w_v = block.self_attn.o_proj.weight.double(), block.self_attn.v_proj.weight.double()
    head_dim = 32 // 8
    assert len(fast) == 8
    for h in range(8):
        g = h // 4
        product = w_o[:, h * head_dim : (h + 1) * head_dim] @ w_v[g * head_dim : (g + 1) * head_dim]
        explicit = torch.linalg.svdvals(product.detach())[:head_dim]
        torch.testing.assert_close(fast[h].sort(descending=True).values, explicit, rtol=1e-9, atol=1e-9)


def test_every_role_reads_the_tensor_it_names(olmo2_series):
    """From disk, each role of the OLMo-2 family is its stored tensor, or q/k/v joined for attn_qkv."""
    series = LocalSeries(olmo2_series)
    family = families.detect(series.model_config(), lambda: series.tensor_names(0))
    assert family is families.get("olmo2")
    stored = Olmo2ForCausalLM.from_pretrained(olmo2_series / branch(7000)).state_dict()
    expected = {
        "unembedding": stored["lm_head.weight"],
        "embedding": stored["model.embed_tokens.weight"],
        "attn_qkv": torch.cat([stored[f"model.layers.1.self_attn.{w}_proj.weight"] for w in "qkv"]),
        "attn_v": stored["model.layers.1.self_attn.v_proj.weight"],
        "attn_out": stored["model.layers.1.self_attn.o_proj.weight"],
        "mlp_in": stored["model.layers.1.mlp.up_proj.weight"],
        "mlp_out": stored["model.layers.1.mlp.down_proj.weight"],
    }
    for role in families.ROLES:
        layer = OmegaConf.create({"name": role, "role": role, "index": 1, "tensor": None})
        resolved = resolve_layer(layer, family, LAYERS, series.model_config())
        view = DerivedTensors(series, resolved.spec) if resolved.spec.derived else series
        got = view.read_tensor(7000, resolved.tensor)
        if role in expected:
            assert torch.equal(got, expected[role]), role
    assert series.steps() == STEPS  # the stage2 ingredient and main are not this series


def test_neox_q_k_v_roles_are_the_interleaved_rows_of_the_fused_qkv():
    neox, d, heads = families.get("gpt_neox"), 8, 2
    fused = torch.arange(3 * d * d, dtype=torch.float32).reshape(3 * d, d)
    per_head = fused.reshape(heads, 3, d // heads, d)
    for which, role in enumerate(("attn_q", "attn_k", "attn_v")):
        spec = neox.tensor(role, 0, {"num_attention_heads": heads})
        assert spec.parts == ("gpt_neox.layers.0.attention.query_key_value.weight",)
        assert torch.equal(spec.derive([fused]), per_head[:, which].reshape(d, d))


def shrunk(tmp_path: Path, *overrides: str) -> list[str]:
    return [f"paths.data_dir={tmp_path}/data", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            "progress=false", "extract.n_distribution_sample=2000", "extract.unit_sample=256",
            *overrides]  # fmt: skip


EVALUATION = ["evaluation=all", "evaluation.steps.select=all", "evaluation.seq_len=16",
              "evaluation.max_windows=16", "evaluation.lambada.heldout_passages=20",
              "evaluation.cka.n_sequences=16", "evaluation.batch_size=8"]  # fmt: skip


@pytest.mark.slow
def test_olmo2_series_on_disk_end_to_end(tmp_path, olmo2_series, small_corpus, compose_config):
    """model=local detects the family from config.json; steps come from the folder names; the duplicated
    branch is excluded; PER, CKA and LAMBADA run on every checkpoint; PER of each GQA OV circuit is that
    of the explicit product."""
    cfg = compose_config(*shrunk(tmp_path, "model=local", f"model.path={olmo2_series}", "layer=attn_v",
                                 "layer.index=1", f"corpus.path={small_corpus}", *EVALUATION))  # fmt: skip
    outcome = run(cfg, output_dir=tmp_path / "out")
    assert outcome.tags["garden.family"] == "olmo2"
    assert outcome.tags["garden.tensor"] == "model.layers.1.self_attn.v_proj.weight"
    assert outcome.tags["garden.duplicates"] == "step6000=step5000"
    analysed = [s for s in STEPS if s not in DUPLICATED]
    assert list(outcome.trajectory.steps) == analysed
    table = pd.read_csv(tmp_path / "out" / "tables" / "evaluation.csv")
    assert list(table["step"]) == analysed
    assert table[["perplexity", "lambada_perplexity", "lambada_accuracy"]].notna().all().all()
    for key in ("cka_attn.1", "cka_mlp.0"):
        assert table[key].iloc[-1] == pytest.approx(1.0)
    final = Olmo2ForCausalLM.from_pretrained(olmo2_series / branch(7000))
    attention = final.model.layers[1].self_attn
    head_dim = 32 // HEADS
    for h in range(HEADS):
        g = h // (HEADS // KV_HEADS)
        product = (attention.o_proj.weight[:, h * head_dim : (h + 1) * head_dim].double()
                   @ attention.v_proj.weight[g * head_dim : (g + 1) * head_dim].double())  # fmt: skip
        explicit = proportional_effective_rank(torch.linalg.svdvals(product.detach())[:head_dim])
        assert table[f"per_ov.1.{h}"].iloc[-1] == pytest.approx(explicit, rel=1e-9)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    recorded = client.get_run(outcome.run_id)
    assert recorded.info.status == "FINISHED"
    assert recorded.data.params["run.n_duplicate_steps"] == "1"
    assert len(client.get_metric_history(outcome.run_id, "eval/per_ov.1.3")) == len(analysed)


@pytest.mark.slow
def test_olmo2_from_the_fake_hub_with_every_role(tmp_path, olmo2_hub_root, compose_config):
    """model=olmo2-1b pointed at the fake Hub's tiny repo: branches parsed by OLMo-2's pattern, each role
    range-read (attn_qkv from three tensors), byte for byte what the series on disk gives."""
    arch = [f"model.architecture.{k}={v}" for k, v in {"vocab_size": 300, "hidden_size": 32,
            "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
            "intermediate_size": 64}.items()]  # fmt: skip
    with FakeHub(olmo2_hub_root) as hub:
        for role in families.ROLES:
            cfg = compose_config(*shrunk(tmp_path, "model=olmo2-1b", f"model.repo={REPO}", *arch,
                                         f"series.endpoint={hub.url}", f"paths.hf_cache={tmp_path}/hf",
                                         "metrics=minimal", f"layer={role}", "figures=false",
                                         "extract.unit_axis=null"))  # fmt: skip
            outcome = run(cfg, output_dir=tmp_path / role)
            assert outcome.tags["garden.family"] == "olmo2", role
            assert outcome.tags["garden.duplicates"] == "step6000=step5000", role
            assert list(outcome.trajectory.steps) == [s for s in STEPS if s not in DUPLICATED], role
            manifest = pd.read_csv(tmp_path / role / "tables" / "hub_manifest.csv")
            assert set(manifest["revision"]) == {branch(s) for s in STEPS}, role
            assert manifest.loc[manifest["step"] == 7000, "tokens"].item() == 28 * 10**9
            assert not (tmp_path / role / "figures").exists()  # figures=false: the tables only
    on_disk = LocalSeries(olmo2_hub_root / REPO)
    from_hub = outcome.trajectory  # the last role's run (mlp_out.0), against the same tensor on disk
    final = on_disk.read_tensor(7000, "model.layers.0.mlp.down_proj.weight").double()
    reference = on_disk.read_tensor(0, "model.layers.0.mlp.down_proj.weight").double()
    assert from_hub.table["msd"].iloc[-1] == pytest.approx(float(((final - reference) ** 2).mean()), rel=1e-6)


def test_a_role_without_a_family_fails_before_any_read(tmp_path, olmo2_series, compose_config):
    cfg = compose_config(*shrunk(tmp_path, "model=local", f"model.path={olmo2_series}",
                                 "model.family=llama"))  # fmt: skip
    with pytest.raises(GardenError, match=r"model.family='llama' is not valid; valid: one of gpt_neox, olmo"):
        run(cfg, output_dir=tmp_path / "out")
    bad = compose_config(*shrunk(tmp_path, "model=local", f"model.path={olmo2_series}",
                                 "model.revision_pattern='stage1-(\\d+)'"))  # fmt: skip
    with pytest.raises(GardenError, match=r"valid: a regex with a \(\?P<step>"):
        run(bad, output_dir=tmp_path / "out")


@pytest.mark.parametrize(
    "model, published",
    [("olmo2-1b", 1.485e9), ("olmo2-7b", 7.30e9), ("olmo2-13b", 13.7e9), ("olmo2-32b", 32.2e9),
     ("pythia-160m", 162e6), ("pythia-1.4b", 1.41e9)],
)  # fmt: skip
def test_compare_counts_parameters_as_each_family_does(compose_config, model, published):
    """Against the published sizes (OLMo-2's model cards, Pythia's rounded names), from logged params."""
    from garden.compare import model_size
    from garden.tracking import flatten

    params = {key: str(value) for key, value in flatten(compose_config(f"model={model}")).items()}
    assert model_size(params) == pytest.approx(published, rel=0.01)


def test_a_scan_of_an_olmo2_series_maps_its_own_roles(olmo2_series, tmp_path, compose_config):
    """task=scan on another family: OLMo-2's stored roles (separate q, k, v; up and down), its duplicated
    branch excluded, and a glob adding the gate projections of block 1 only."""
    import pandas as pd

    from garden.tasks import run

    cfg = compose_config(*shrunk(tmp_path, "task=scan", "model=local", f"model.path={olmo2_series}",
                                 "metrics=minimal", "figures=false", "scan.include=['*gate_proj*']",
                                 "scan.blocks=1:"))  # fmt: skip
    outcome = run(cfg, output_dir=tmp_path / "out")
    summary = pd.read_csv(tmp_path / "out" / "tables" / "scan_summary.csv")
    roles = ["attn_q", "attn_k", "attn_v", "attn_out", "mlp_in", "mlp_out", "-"]  # "-": the glob's tensor
    assert list(summary["role"].fillna("-")) == roles
    assert summary["tensor"].iloc[-1] == "model.layers.1.mlp.gate_proj.weight"
    assert set(summary["block"]) == {1}  # the embeddings go with block 0's shard
    assert (summary["n_steps"] == len(STEPS) - 1).all()  # step 6000 repeats step 5000
    assert outcome["aggregates"]["scan_tensors"] == 7
