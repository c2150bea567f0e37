"""The Hub source against a fake Hub on 127.0.0.1 in each behaviour real servers have: LFS or plain git
files (or only ETags), `Range` honoured or ignored, 4xx answers, faults; every weight layout, duplicates,
the caches, offline, fetching ahead."""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import torch
from huggingface_hub import constants, scan_cache_dir
from mlflow.tracking import MlflowClient

from conftest import neox_state, planted_fork, write_series
from fakehub import FakeHub, Fault
from garden.errors import GardenError
from garden.hub import HubSeries

REPO = "garden-test/neox-fork"
STEPS = [0, 1, 2, 4, 8, 12, 16, 20, 24]
# The rest: single safetensors. Step 16 is a pre-zip (legacy) torch file.
LAYOUT = {2: "sharded_safetensors", 4: "bin", 8: "sharded_bin", 16: "legacy_bin"}
HEAD = "embed_out.weight"
# (ids, honour_range): the Hub itself; a git mirror that ignores Range; a server known only by ETags.
MODES = {"hub": ("lfs", True), "git-mirror": ("blob", False), "etag-only": ("etag", True)}


def branch_states() -> dict[int, dict[str, torch.Tensor]]:
    values = planted_fork(STEPS, onset=8, n=16 * 1000)
    values[1] = values[0].clone()  # Pythia's step0 == step1 fault: a duplicated branch
    return {s: neox_state(v.reshape(1000, 16).half(), d=16) for s, v in values.items()}


def write_branch(root: Path, repo: str, step: int, state: dict[str, torch.Tensor], layout: str) -> None:
    if layout != "legacy_bin":
        write_series(root / repo, {step: state}, layout)
        return
    folder = root / repo / f"step{step}"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)


class Exploit:
    """Pickles as a call to os.system: a `.bin` that would run code when unpickled unrestricted."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hub")
    for step, state in branch_states().items():
        write_branch(root, REPO, step, state, LAYOUT.get(step, "safetensors"))
    (root / REPO / "step24" / "config.json").write_text('{"num_hidden_layers": 2}')
    # A branch cut short on the server: its header places the tensors beyond the end of the file.
    state = branch_states()[0]
    write_branch(root, "garden-test/truncated", 0, state, "safetensors")
    write_branch(root, "garden-test/truncated", 1, state, "safetensors")
    cut = root / "garden-test/truncated/step1/model.safetensors"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    # A `.bin` whose data.pkl would run a command if it were unpickled without restriction.
    evil = root / "garden-test/evil/step0/pytorch_model.bin"
    evil.parent.mkdir(parents=True)
    torch.save({HEAD: torch.zeros(4, 4)}, evil)
    with zipfile.ZipFile(evil) as source:
        members = {info.filename: source.read(info) for info in source.infolist()}
    pkl = next(name for name in members if name.endswith("/data.pkl"))
    members[pkl] = pickle.dumps({HEAD: Exploit(root / "pwned")}, protocol=2)
    with zipfile.ZipFile(evil, "w", zipfile.ZIP_STORED) as target:
        for name, data in members.items():
            target.writestr(name, data)
    return root


@pytest.fixture(params=list(MODES))
def hub(request, hub_root):
    ids, honour_range = MODES[request.param]
    with FakeHub(hub_root, ids=ids, honour_range=honour_range) as server:
        yield server


@pytest.fixture
def lfs_hub(hub_root):
    with FakeHub(hub_root) as server:
        yield server


def series_on(hub, cache: Path, repo: str = REPO, **kwargs) -> HubSeries:
    kwargs.setdefault("sleep", lambda seconds: None)
    return HubSeries(
        repo, "fork", cache_dir=cache / "garden", hf_cache=cache / "hf", endpoint=hub.url, **kwargs
    )


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8))


def test_every_layout_reads_the_right_tensor_from_every_kind_of_server(hub, tmp_path, caplog):
    series = series_on(hub, tmp_path)
    assert series.steps() == STEPS
    states = branch_states()
    with caplog.at_level(logging.WARNING, logger="garden.hub"):
        for step in STEPS:
            assert_same(series.read_tensor(step, HEAD), states[step][HEAD])
    assert series.locate(2, HEAD).filename.startswith("model-0000")
    assert series.locate(4, HEAD).fmt == "bin" and series.locate(8, HEAD).filename.startswith(
        "pytorch_model-0000"
    )
    assert "gpt_neox.layers.1.mlp.dense_4h_to_h.weight" in series.tensor_names(2)
    assert series.tensor_names(4) == sorted(states[4])  # from the .bin's data.pkl, read by ranges
    assert series.tensor_shape(4, HEAD) == ((1000, 16) if hub.honour_range else None)
    # Zip-format .bin branches are range-read; only the legacy one is downloaded whole (all of them
    # where the server ignores Range: reading a zip's tail would stream the whole file anyway).
    bins = "range" if hub.honour_range else "download"
    assert {s: series.how[s] for s in (4, 8, 16)} == {4: bins, 8: bins, 16: "download"}
    # step1 shares step0's file: the same content id whatever kind the server gives, read from the cache.
    kind = {"hub": "sha256", "git-mirror": "git-blob", "etag-only": "etag"}[_mode(hub)]
    assert series.locate(0, HEAD).id_kind == kind
    assert series.content_id(1, HEAD) == series.content_id(0, HEAD) != series.content_id(12, HEAD)
    assert series.how[1] == "cache"
    ignored = [r for r in caplog.records if "ignores `Range`" in r.getMessage()]
    assert len(ignored) == (0 if hub.honour_range else 1)  # one warning naming the server behaviour
    legacy = sum("not a zip-format checkpoint" in r.getMessage() for r in caplog.records)
    assert legacy == (1 if hub.honour_range else 0)


def _mode(hub: FakeHub) -> str:
    return next(name for name, (ids, honour) in MODES.items() if (ids, honour) == (hub.ids, hub.honour_range))


def test_range_reads_fetch_little_more_than_the_tensor(lfs_hub, tmp_path):
    series = series_on(lfs_hub, tmp_path)
    tensor_bytes = 1000 * 16 * 2
    series.read_tensor(12, HEAD)
    # The header probe takes the whole (small) file here; the tensor itself is fetched exactly once more.
    assert series.fetched[12] <= series.locate(12, HEAD).size + tensor_bytes
    series.read_tensor(4, HEAD)  # .bin: the zip's tail, data.pkl, then the storage alone
    assert series.fetched[4] <= tensor_bytes + 65_536 + 8_192
    # A second run asks the server nothing. (Counted in requests, which the server logs before it answers:
    # it adds up the bytes it sent after writing them, so the last answer's may be counted late.)
    asked = len(lfs_hub.requests)
    again = series_on(lfs_hub, tmp_path)
    again.read_tensor(12, HEAD)
    again.read_tensor(4, HEAD)
    assert lfs_hub.requests[asked:] == [] and again.fetched == {}


def test_a_server_that_ignores_range_is_read_up_to_the_bytes_needed(hub_root, tmp_path):
    with FakeHub(hub_root, honour_range=False) as hub:
        series = series_on(hub, tmp_path)
        size = series.locate(12, HEAD).size
        assert_same(series.read_tensor(12, HEAD), branch_states()[12][HEAD])
        # The header and the tensor each stream the file only as far as they need; nothing is retried.
        assert series.fetched[12] <= 2 * size
        assert sum(r.startswith("GET") and "step12/model.safetensors" in r for r in hub.requests) == 2


def test_faults_are_retried_and_never_used(lfs_hub, tmp_path):
    lfs_hub.faults = [
        Fault("step12/model.safetensors", "500", 2),
        Fault("step12/model.safetensors", "truncate"),
        Fault("step12/model.safetensors", "drop"),
        Fault("paths-info/step16", "500"),
    ]
    waits: list[float] = []
    series = series_on(lfs_hub, tmp_path, retries=5, backoff_seconds=0.5, sleep=waits.append)
    assert_same(series.read_tensor(12, HEAD), branch_states()[12][HEAD])
    assert waits == [0.5, 1.0, 2.0, 4.0]  # exponential backoff over the four header/range faults
    series.read_tensor(16, HEAD)


def test_corrupt_bytes_are_discarded_and_fetched_again(lfs_hub, tmp_path):
    # A .bin's data.pkl and storage fail their CRC-32 (reads 2 and 3: the zip's tail comes first); a
    # whole (legacy) download fails its sha256 (read 2: the first finds no zip directory).
    lfs_hub.faults = [
        Fault("step4/pytorch_model.bin", "corrupt", times=2, after=1),
        Fault("step16/pytorch_model.bin", "corrupt", after=1),
    ]
    series = series_on(lfs_hub, tmp_path)
    assert_same(series.read_tensor(4, HEAD), branch_states()[4][HEAD])
    assert_same(series.read_tensor(16, HEAD), branch_states()[16][HEAD])
    assert series.how[16] == "download"


def test_answers_that_cannot_change_fail_at_once_naming_what_to_check(lfs_hub, tmp_path):
    waits: list[float] = []
    started = time.perf_counter()
    with pytest.raises(
        GardenError, match=r"repository garden-test/nope was not found on .*HTTP 401.*model\.repo"
    ):
        series_on(lfs_hub, tmp_path, repo="garden-test/nope", sleep=waits.append).steps()
    series = series_on(lfs_hub, tmp_path, sleep=waits.append)
    with pytest.raises(GardenError, match=r"step 7: .*no such revision .*no branch is step 7.*steps"):
        series.locate(7, HEAD)
    series.manifest["branches"].append("step7")  # a listing that went stale: the server says 404
    series._revisions = None
    with pytest.raises(GardenError, match=r"step 7: .*no such revision .*HTTP 404.*steps"):
        series.locate(7, HEAD)
    truncated = series_on(lfs_hub, tmp_path, repo="garden-test/truncated", sleep=waits.append)
    truncated.read_tensor(0, HEAD)
    with pytest.raises(
        GardenError, match=r"step 1: .*beyond the file's \d+ bytes: the checkpoint is truncated"
    ):
        truncated.read_tensor(1, HEAD)
    assert waits == [] and time.perf_counter() - started < 5  # nothing was retried


def test_a_pickle_that_would_run_code_is_refused(lfs_hub, hub_root, tmp_path):
    series = series_on(lfs_hub, tmp_path, repo="garden-test/evil")
    with pytest.raises(GardenError, match=r"step 0: .*posix\.system.*nothing .*executed"):
        series.read_tensor(0, HEAD)
    assert not (hub_root / "pwned").exists()


def test_offline_works_from_the_caches_and_names_missing_steps(lfs_hub, tmp_path, monkeypatch):
    online = series_on(lfs_hub, tmp_path)
    for step in (0, 4, 12, 16):
        online.read_tensor(step, HEAD)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = series_on(lfs_hub, tmp_path)
    assert offline.missing_from_cache([0, 4, 12, 16], HEAD) == []
    assert_same(offline.read_tensor(4, HEAD), branch_states()[4][HEAD])
    assert offline.tensor_names(4) == sorted(branch_states()[4])
    assert offline.missing_from_cache([0, 2, 12, 20], HEAD) == [2, 20]
    with pytest.raises(GardenError, match="HF_HUB_OFFLINE"):
        offline.read_tensor(20, HEAD)


def test_garden_keeps_its_cache_out_of_the_hugging_face_cache(lfs_hub, tmp_path):
    series = series_on(lfs_hub, tmp_path)
    for step in STEPS:
        series.read_tensor(step, HEAD)
    assert (tmp_path / "garden" / "hub" / "garden-test--neox-fork" / "manifest.json").is_file()
    info = scan_cache_dir(tmp_path / "hf")  # shard indexes and the legacy .bin
    assert info.warnings == [] and {r.repo_id for r in info.repos} == {REPO}
    assert not (tmp_path / "hf" / "garden").exists()


def test_the_manifest_says_how_each_step_was_read(lfs_hub, tmp_path):
    series = series_on(lfs_hub, tmp_path)
    for step in (0, 1, 4, 12, 0, 12):  # steps read again come from the cache, but were fetched in this run
        series.read_tensor(step, HEAD)
    report = {row["step"]: row for row in series.fetch_report([0, 1, 4, 12], HEAD)}
    assert {s: r["how"] for s, r in report.items()} == {0: "range", 1: "cache", 4: "range", 12: "range"}
    assert report[0]["id_kind"] == "sha256" and len(report[0]["content_id"]) == 64


# ------------------------------------------------------------------------------------------- whole runs


def hub_overrides(hub: FakeHub, tmp_path: Path) -> list[str]:
    return [
        "model=pythia-14m", f"model.repo={REPO}", "model.architecture.num_hidden_layers=2",
        f"paths.hf_cache={tmp_path}/hf", f"paths.cache_dir={tmp_path}/garden-cache",
        f"series.endpoint={hub.url}", "series.backoff_seconds=0.01",
        "figures=false",  # the reads and the numbers are the subject here
    ]  # fmt: skip


def compared_with_local(compose_config, tmp_path: Path):
    """Run the same series from files on disk (without the duplicated step1); the Hub run's summary
    metrics must equal that run's to 1e-12. Returns the client and the (hub, local) runs."""
    from test_cli import run_in_process

    local = tmp_path / "local"
    write_series(local, {s: v for s, v in branch_states().items() if s != 1}, "safetensors")
    run_in_process(
        compose_config, tmp_path, "model=local", f"model.path={local}", "figures=false", out="local-run"
    )
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("garden").experiment_id])
    by_model = {r.data.tags["garden.model"]: r for r in runs}
    hub_run, local_run = by_model["pythia-14m"], by_model["local"]
    assert hub_run.data.tags["garden.duplicates"] == "step1=step0"
    for key in ("bifurcation_step", "alpha", "final_msd", "final_bimodality_coefficient"):
        key = f"summary/{key}"
        assert hub_run.data.metrics[key] == pytest.approx(local_run.data.metrics[key], rel=1e-12), key
    return client, hub_run, local_run


@pytest.mark.slow
def test_a_hub_run_matches_the_same_series_on_disk(hub, tmp_path, compose_config, monkeypatch):
    from test_cli import run_in_process

    run_in_process(compose_config, tmp_path, *hub_overrides(hub, tmp_path), "series.prefetch=3")
    fetched_once = hub.bytes_sent
    client, hub_run, local_run = compared_with_local(compose_config, tmp_path)
    assert hub_run.info.run_name == "pythia-14m/standard/unembedding"
    facts = hub_run.data.params  # counts are params `run.<key>`, not metric charts
    assert facts["run.n_duplicate_steps"] == "1"
    assert 0 < int(facts["run.hub_bytes_fetched"]) <= int(facts["run.hub_file_bytes"]) * 2
    hub_msd = [(m.step, m.value) for m in client.get_metric_history(hub_run.info.run_id, "diffusion/msd")]
    local_msd = [(m.step, m.value) for m in client.get_metric_history(local_run.info.run_id, "diffusion/msd")]
    assert [s for s, _ in sorted(hub_msd)] == [s for s, _ in sorted(local_msd)] and 1 not in dict(hub_msd)
    assert [v for _, v in sorted(hub_msd)] == pytest.approx([v for _, v in sorted(local_msd)], rel=1e-12)
    manifest_path = client.download_artifacts(hub_run.info.run_id, "tables/hub_manifest.csv", str(tmp_path))
    manifest = pd.read_csv(manifest_path).set_index("step")
    assert list(manifest.index) == STEPS
    assert manifest.loc[1, "duplicate_of"] == 0 and not manifest.loc[1, "analysed"]
    assert manifest.loc[4, "format"] == "bin"
    assert manifest.loc[4, "how"] == ("range" if hub.honour_range else "download")
    assert manifest.loc[16, "how"] == "download"
    assert set(manifest["id_kind"]) == {{"lfs": "sha256", "blob": "git-blob", "etag": "etag"}[hub.ids]}

    # A second run, and an offline one, fetch nothing more.
    again = [*hub_overrides(hub, tmp_path), "metrics=minimal"]  # the reads are the subject, not metrics
    run_in_process(compose_config, tmp_path, *again, out="o3")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    run_in_process(compose_config, tmp_path, *again, out="o4")
    assert hub.bytes_sent == fetched_once


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="olah's mirror mode serves git repositories")
def test_an_independent_hub_server_gives_the_same_run_as_the_files_on_disk(
    hub_root, tmp_path, compose_config
):
    """olah (a self-hosted mirror garden did not write): plain git blobs, `Range` ignored, its own 4xx."""
    from olahhub import OlahServer, build_mirror
    from test_cli import run_in_process

    build_mirror(hub_root / REPO, tmp_path / "mirrors", REPO)
    with OlahServer(tmp_path / "mirrors", tmp_path / "olah") as olah:
        series = HubSeries(REPO, "olah", cache_dir=tmp_path / "c", hf_cache=tmp_path / "h", endpoint=olah.url)
        for step in STEPS:
            assert_same(series.read_tensor(step, HEAD), branch_states()[step][HEAD])
        assert series.locate(0, HEAD).id_kind == "git-blob" and series.ignores_range
        assert series.content_id(1, HEAD) == series.content_id(0, HEAD)
        started = time.perf_counter()
        with pytest.raises(GardenError, match="garden-test/nope"):
            HubSeries("garden-test/nope", "x", tmp_path / "c", tmp_path / "h", olah.url).steps()
        assert time.perf_counter() - started < 5

        olah_override = hub_overrides(olah, tmp_path)
        run_in_process(compose_config, tmp_path, *olah_override)
    compared_with_local(compose_config, tmp_path)


@pytest.mark.slow
def test_hub_policies_and_offline_gaps(lfs_hub, tmp_path, compose_config, monkeypatch):
    from test_cli import run_in_process

    hub = [*hub_overrides(lfs_hub, tmp_path), "metrics=minimal"]
    run_in_process(compose_config, tmp_path, *hub, "series.on_duplicate=keep")
    with pytest.raises(GardenError, match=r"duplicated checkpoints .identical weights.: step1 = step0"):
        run_in_process(compose_config, tmp_path, *hub, "series.on_duplicate=error", out="o2")
    other = tmp_path / "other"
    other.mkdir()
    hub = [*hub_overrides(lfs_hub, other), "metrics=minimal"]
    run_in_process(compose_config, other, *hub, "steps=list", "steps.values=[0,12,24]")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(GardenError, match=r"HF_HUB_OFFLINE is set and the cache lacks embed_out.weight for "
                                          r"steps \[1, 2, 4, 8, 16, 20\]"):  # fmt: skip
        run_in_process(compose_config, other, *hub, out="o2")


def test_a_missing_repository_fails_at_once(lfs_hub, tmp_path, compose_config):
    """In seconds, with no retry: the repository is named, and what to check."""
    from test_cli import run_in_process

    started = time.perf_counter()
    with pytest.raises(GardenError, match=r"repository garden-test/nope was not found") as failed:
        run_in_process(
            compose_config, tmp_path, *hub_overrides(lfs_hub, tmp_path), "model.repo=garden-test/nope"
        )
    assert "retry" not in str(failed.value)
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize("model", ["pythia-14m", "pythia-31m"])
def test_deduped_variant_of_models_without_one_fails_at_once(tmp_path, compose_config, model):
    from test_cli import run_in_process

    refused = rf"variant='deduped' is not valid; valid: standard \(model={model} has no deduped variant\)"
    with pytest.raises(GardenError, match=refused):
        run_in_process(compose_config, tmp_path, f"model={model}", "variant=deduped")


SCANNED = [HEAD, "gpt_neox.embed_in.weight"] + [
    f"gpt_neox.layers.{i}.{m}.weight"
    for i in (0, 1)
    for m in ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
]


@pytest.mark.parametrize("keep_files", [False, True])
def test_a_scan_fetches_a_file_in_few_reads_and_keeps_nothing_unless_asked(
    hub, hub_root, tmp_path, keep_files
):
    """The scan's Hub reads: every tensor of a file (single or sharded safetensors) in one range read after
    its header, fetched ahead, the same records as the files on disk, and no spool or tensor left behind
    (series.keep_files keeps the tensors in garden's cache)."""
    from garden.extract import ExtractionPlan
    from garden.extract.stream import extract_scan
    from garden.series import LocalSeries

    steps = (0, 2, 12, 20)  # single and sharded safetensors
    small = {"n_distribution_sample": 64, "unit_sample": 16}
    plans = [ExtractionPlan(tensor=name, steps=steps, reference_step=0, **small) for name in SCANNED]
    series = series_on(hub, tmp_path, keep_files=keep_files)
    asked = len(hub.requests)
    remote = extract_scan(series, plans, tmp_path / "extract", progress=False, prefetch=2)
    local = extract_scan(LocalSeries(hub_root / REPO), plans, tmp_path / "local", progress=False)
    for from_hub, on_disk in zip(remote, local, strict=True):
        assert from_hub.trajectory().table.equals(on_disk.trajectory().table), from_hub.plan.tensor
    reads = [r for r in hub.requests[asked:] if r.startswith("GET") and "/resolve/step12/" in r]
    if hub.honour_range:
        assert len(reads) <= 2  # the header, then the ten tensors in one read
    kept = sorted((tmp_path / "garden").rglob("*.safetensors"))
    assert not any("spool" in str(p) for p in kept)
    assert len(kept) == (len(SCANNED) * len(steps) if keep_files else 0)
