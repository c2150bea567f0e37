"""garden.torchzip against torch.load: real torch.save checkpoints, read through counted range reads."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from garden.errors import GardenError
from garden.torchzip import (
    NotTorchZip,
    TorchZipReader,
    UnsafePickle,
    data_offset,
    read_directory,
    read_tensor,
    tensor_records,
)


class FileRanges:
    """A ReadRange over a local file that counts what it was asked for."""

    def __init__(self, path: Path) -> None:
        self.data = path.read_bytes()
        self.size = len(self.data)
        self.calls: list[tuple[int, int]] = []

    def __call__(self, first: int, last: int) -> bytes:
        assert 0 <= first <= last < self.size, (first, last, self.size)
        self.calls.append((first, last))
        return self.data[first : last + 1]

    @property
    def bytes_read(self) -> int:
        return sum(last - first + 1 for first, last in self.calls)


def neox_like() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    w = torch.randn(10, 8).half()
    return {
        "gpt_neox.embed_in.weight": torch.randn(50, 16).half(),
        "a": w,
        "b": w[2:5],
        "t": w.t(),
        "cols": w[:, 1::3],
        "gpt_neox.layers.0.attention.bias": torch.ones(1, 1, 4, 4, dtype=torch.bool).tril(),
        "gpt_neox.layers.0.attention.masked_bias": torch.tensor(-1e9),
        "gpt_neox.layers.0.attention.rotary_emb.inv_freq": torch.rand(4),
        "bf": torch.randn(6, 3).bfloat16(),
        "bf_row": torch.randn(6, 3).bfloat16()[4],
        "i64": torch.arange(7),
        "empty": torch.empty(0, 3),
        "u16": torch.tensor([1, 2, 60000]).to(torch.uint16),
        "param": torch.nn.Parameter(torch.randn(3, 2)),
        "embed_out.weight": torch.randn(4000, 64).half(),
    }


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape and got.stride() == want.stride()
    assert torch.equal(got, want)
    if got.numel():  # bit for bit, NaN-safe

        def bits(t: torch.Tensor) -> torch.Tensor:
            return t.resolve_conj().contiguous().view(-1).view(torch.uint8)

        assert torch.equal(bits(got), bits(want))


def saved(tmp_path: Path, sd: dict, name: str = "pytorch_model.bin", **kw) -> Path:
    path = tmp_path / name
    torch.save(sd, path, **kw)
    return path


def rewrite(src: Path, dst: Path, rename=lambda n: n, change=lambda n, b: b, zip64: bool = False) -> Path:
    """Copy a checkpoint's members into a new stored zip (new names, contents or ZIP64 records)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            with zout.open(rename(info.filename), "w", force_zip64=zip64) as out:
                out.write(change(info.filename, zin.read(info.filename)))
    return dst


def test_every_tensor_matches_torch_load(tmp_path: Path) -> None:
    path = saved(tmp_path, neox_like())
    want = torch.load(path, weights_only=True)
    read = FileRanges(path)
    reader = TorchZipReader(read, read.size)
    assert set(reader.records) == set(want)
    for name, tensor in want.items():
        assert_same(reader.tensor(name), tensor)
    assert reader.prefix == "pytorch_model" and not reader.big_endian
    assert reader.bytes_read == read.bytes_read and reader.ranges == read.calls


def test_one_big_tensor_costs_little_more_than_its_bytes(tmp_path: Path) -> None:
    sd = neox_like() | {f"layer{i}.weight": torch.randn(300, 64).half() for i in range(20)}
    path = saved(tmp_path, sd)
    read = FileRanges(path)
    got = read_tensor(read, read.size, "embed_out.weight")
    assert_same(got, torch.load(path, weights_only=True)["embed_out.weight"])
    pkl = zipfile.ZipFile(path).getinfo("pytorch_model/data.pkl").file_size
    overhead = 65_536 + 200 + pkl + 4 * 128  # tail (directory), data.pkl, local headers
    assert read.bytes_read <= 1.05 * 4000 * 64 * 2 + overhead
    assert read.bytes_read < read.size / 2
    assert len(read.calls) <= 4  # tail, data.pkl + byteorder, storage with its header


def test_a_view_of_a_big_storage_reads_only_the_view(tmp_path: Path) -> None:
    big = torch.randn(4000, 64).half()
    path = saved(tmp_path, {"row": big[1234], "block": big[100:110, 8:16]})
    want = torch.load(path, weights_only=True)
    read = FileRanges(path)
    reader = TorchZipReader(read, read.size)
    reader.records  # noqa: B018 - directory and data.pkl
    before = read.bytes_read
    assert_same(reader.tensor("row"), want["row"])
    assert read.bytes_read - before <= 64 * 2 + 200
    assert_same(reader.tensor("block"), want["block"])


def test_archive_prefix_and_an_old_style_prefix(tmp_path: Path) -> None:
    sd = neox_like()
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    archive = tmp_path / "buffer.bin"
    archive.write_bytes(buffer.getvalue())
    old = rewrite(archive, tmp_path / "old.bin", rename=lambda n: n.replace("archive/", "pytorch_model/", 1))
    for path, prefix in ((archive, "archive"), (old, "pytorch_model")):
        read = FileRanges(path)
        reader = TorchZipReader(read, read.size)
        want = torch.load(path, weights_only=True)  # torch reads either prefix too
        for name in ("a", "b", "t", "bf", "embed_out.weight"):
            assert_same(reader.tensor(name), want[name])
            assert torch.equal(want[name], sd[name])
        assert reader.prefix == prefix


def test_zip64_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = saved(tmp_path, neox_like())
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 0)  # every offset and size "needs" ZIP64 records
    path = rewrite(original, tmp_path / "zip64.bin", zip64=True)
    monkeypatch.undo()
    assert b"PK\x06\x06" in path.read_bytes()[-200:]  # the ZIP64 end record is there
    read = FileRanges(path)
    directory = read_directory(read, read.size)
    assert directory["pytorch_model/data/0"].local_header_offset > 0
    want = torch.load(original, weights_only=True)
    assert all(torch.equal(t, want[k]) for k, t in torch.load(path, weights_only=True).items())
    reader = TorchZipReader(read, read.size)
    for name, tensor in want.items():
        assert_same(reader.tensor(name), tensor)


def test_data_offset_reads_the_local_header(tmp_path: Path) -> None:
    path = saved(tmp_path, {"x": torch.arange(10)})
    read = FileRanges(path)
    entry = read_directory(read, read.size)["pytorch_model/data/0"]
    start = data_offset(read, entry)
    assert start % 64 == 0  # torch aligns storages; the padding is in the local extra field only
    assert read.data[start : start + 80] == torch.arange(10).numpy().tobytes()


def test_big_endian_checkpoint(tmp_path: Path) -> None:
    sd = {"h": torch.randn(5, 3).half(), "c": torch.randn(4, dtype=torch.cfloat), "f": torch.randn(2, 2).t()}
    original = saved(tmp_path, sd)
    records = tensor_records(zipfile.ZipFile(original).read("pytorch_model/data.pkl"))
    widths = {
        f"pytorch_model/data/{r.storage_key}": r.dtype.itemsize // (2 if r.dtype.is_complex else 1)
        for r in records.values()
    }

    def swap(name: str, body: bytes) -> bytes:
        if name.endswith("/byteorder"):
            return b"big"
        if name in widths:
            w = widths[name]
            return b"".join(body[i : i + w][::-1] for i in range(0, len(body), w))
        return body

    path = rewrite(original, tmp_path / "big.bin", change=swap)
    read = FileRanges(path)
    reader = TorchZipReader(read, read.size)
    for name, tensor in sd.items():
        assert_same(reader.tensor(name), tensor)
    assert reader.big_endian
    for name, tensor in torch.load(path, weights_only=True).items():
        assert torch.equal(tensor, sd[name])


def test_legacy_format_is_not_a_zip(tmp_path: Path) -> None:
    path = saved(tmp_path, {"x": torch.ones(3)}, _use_new_zipfile_serialization=False)
    read = FileRanges(path)
    with pytest.raises(NotTorchZip):
        read_tensor(read, read.size, "x")
    noise = tmp_path / "noise"
    noise.write_bytes(os.urandom(100_000))
    for path in (noise, tmp_path / "empty"):
        path.touch()
        read = FileRanges(path)
        with pytest.raises(NotTorchZip):
            read_directory(read, read.size)


class Evil:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return os.system, (f"echo pwned > {self.target}",)


@pytest.mark.parametrize("payload", ["system", "eval", "inst"])
def test_malicious_pickle_runs_nothing(tmp_path: Path, payload: str) -> None:
    target = tmp_path / "pwned"
    if payload == "system":
        pkl = pickle.dumps({"x": Evil(target)}, protocol=2)
    elif payload == "eval":
        pkl = b"cbuiltins\neval\n(Vopen(" + repr(str(target)).encode() + b", 'w')\ntR."
    else:  # INST calls find_class too, but is refused by opcode before anything runs
        pkl = b"(S'echo pwned'\nios\nsystem\n."
    original = saved(tmp_path, {"x": torch.ones(3)})
    path = rewrite(original, tmp_path / "evil.bin", change=lambda n, b: pkl if n.endswith("data.pkl") else b)
    read = FileRanges(path)
    with pytest.raises(UnsafePickle, match="nothing") as err:
        read_tensor(read, read.size, "x")
    assert {"system": "system", "eval": "builtins.eval", "inst": "INST"}[payload] in str(err.value)
    assert not target.exists()


def test_corrupt_storage_fails_the_crc(tmp_path: Path) -> None:
    path = saved(tmp_path, {"w": torch.randn(100, 8).half(), "x": torch.ones(3)})
    read = FileRanges(path)
    entry = read_directory(read, read.size)["pytorch_model/data/0"]
    at = data_offset(read, entry) + 17
    data = bytearray(path.read_bytes())
    data[at] ^= 0x40
    path.write_bytes(bytes(data))
    read = FileRanges(path)
    with pytest.raises(GardenError, match="pytorch_model/data/0 fails its CRC-32"):
        read_tensor(read, read.size, "w")
    assert_same(read_tensor(read, read.size, "x"), torch.ones(3))


def test_missing_tensor_names_it_and_some_that_exist(tmp_path: Path) -> None:
    path = saved(tmp_path, {"embed_in.weight": torch.ones(2), "embed_out.weight": torch.ones(2)})
    read = FileRanges(path)
    with pytest.raises(GardenError, match=r"no tensor 'nope'.*embed_in\.weight"):
        read_tensor(read, read.size, "nope")


def test_short_read_is_refused(tmp_path: Path) -> None:
    path = saved(tmp_path, {"x": torch.ones(3)})
    read = FileRanges(path)
    with pytest.raises(GardenError, match="returned"):
        read_tensor(lambda a, b: read(a, b)[:-1], read.size, "x")


def test_records_skip_non_tensors_and_keep_metadata(tmp_path: Path) -> None:
    c = torch.randn(3, dtype=torch.complex64).conj()
    path = saved(tmp_path, {"c": c, "step": 5, "note": "hi"})
    records = tensor_records(zipfile.ZipFile(path).read("pytorch_model/data.pkl"))
    assert set(records) == {"c"} and records["c"].metadata == {"conj": True}
    read = FileRanges(path)
    got = read_tensor(read, read.size, "c")
    assert got.is_conj() and torch.equal(got, c)


def test_a_directory_larger_than_the_tail_read(tmp_path: Path) -> None:
    sd = {f"gpt_neox.layers.{i}.mlp.dense_h_to_4h.weight": torch.full((2,), float(i)) for i in range(1500)}
    path = saved(tmp_path, sd)
    read = FileRanges(path)
    directory = read_directory(read, read.size)
    assert len(directory) > 1500 and len(read.calls) == 2  # the tail, then the rest of the directory
    assert_same(
        read_tensor(read, read.size, "gpt_neox.layers.1234.mlp.dense_h_to_4h.weight"),
        sd["gpt_neox.layers.1234.mlp.dense_h_to_4h.weight"],
    )


def test_tensors_with_python_state_and_new_dtypes(tmp_path: Path) -> None:
    tagged = torch.randn(3)
    tagged.note = "kept by torch.save via _rebuild_from_type_v2"
    param = torch.nn.Parameter(torch.randn(2))
    param.note = 1  # _rebuild_parameter_with_state
    sd = {"tagged": tagged, "param": param, "f8": torch.randn(5).to(torch.float8_e4m3fn)}
    path = saved(tmp_path, sd)
    want = torch.load(path, weights_only=True)
    read = FileRanges(path)
    reader = TorchZipReader(read, read.size)
    for name in sd:
        assert_same(reader.tensor(name), want[name].detach())
