"""Opening shards reads counts, not tokens: index.json and per-shard metadata, checked cheaply; the
older format (no metadata, no index) still reads; --verify-data reads every token."""

import json

import numpy as np
import pyarrow as pa
import pytest

from lvm.data.shards.format import SCHEMA, ShardError, read_recorded_stats, write_shard
from lvm.data.shards.shard_set import open_shards
from lvm.data.windows.source import SourceWindows


def rows_for(seed, n, kinds=("image", "video")):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(1, 4))
        out.append({"tokens": rng.integers(0, 8192, 256 * k, dtype=np.uint16), "n_images": k, "kind": kinds[i % len(kinds)],
                    "id": f"{seed}-{i}"})
    return out


def write_legacy(path, rows):
    """A shard as written before counts were recorded: the same columns, no schema metadata."""
    tokens = [r["tokens"] for r in rows]
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in tokens])]).astype(np.int32)
    batch = pa.record_batch([pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(tokens))),
                             pa.array([r["n_images"] for r in rows], pa.int32()), pa.array([r["kind"] for r in rows]),
                             pa.array([r["id"] for r in rows])], schema=SCHEMA)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as w:
        w.write_batch(batch)


def write_index(out, files, fmt=2):
    shards = []
    for f in files:
        rec = read_recorded_stats(f)
        entry = {"path": f"train/{f.name}", "sentences": rec["sentences"], "images": rec["images"], "bytes": f.stat().st_size}
        if fmt == 2:
            entry.update(tokens=rec["tokens"], max_token=rec["max_token"], kinds=rec["kinds"])
        shards.append(entry)
    (out / "index.json").write_text(json.dumps({"format": f"lvm-shards/{fmt}", "shards": shards}))


@pytest.fixture()
def folder(tmp_path):
    train = tmp_path / "out" / "train"
    for s in range(3):
        write_shard(train / f"u-{s:05d}.arrow", rows_for(s, 5 + s))
    return train


def test_counts_come_from_the_index_or_metadata_without_reading_tokens(folder):
    rec = read_recorded_stats(folder / "u-00000.arrow")
    rows = rows_for(0, 5)
    assert rec["sentences"] == 5 and rec["tokens"] == sum(len(r["tokens"]) for r in rows)
    assert rec["max_token"] == max(int(r["tokens"].max()) for r in rows)
    assert sum(rec["length_counts"].values()) == 5 and sum(rec["kinds"].values()) == 5
    for fmt in (None, 1, 2):
        if fmt:
            write_index(folder.parent, sorted(folder.glob("*.arrow")), fmt)
        shards = open_shards(folder)
        assert not shards._open and shards.scanned == 0  # nothing memory-mapped yet
        assert len(shards) == 5 + 6 + 7 and shards.kind_counts.sum() == 18
        assert shards.lengths().tolist() == [len(r["tokens"]) for s in range(3) for r in rows_for(s, 5 + s)]
        assert shards.ids.tolist()[:2] == ["0-0", "0-1"] and shards.kinds.tolist()[:2] == ["image", "video"]


def test_index_mismatches_are_one_line_errors(folder):
    files = sorted(folder.glob("*.arrow"))
    write_index(folder.parent, files)
    write_shard(files[1], rows_for(1, 4))  # rewritten after indexing: its size changed
    shards = open_shards(folder)  # start-up stats no shard: the size is checked when the shard is opened
    shards.shard(0)
    with pytest.raises(ShardError, match="u-00001.arrow has .* bytes, .*index.json says"):
        shards.shard(1)
    with pytest.raises(ShardError, match="u-00001.arrow has .* bytes, .*index.json says"):
        open_shards(folder, verify=True)
    write_index(folder.parent, files)
    files[2].unlink()
    with pytest.raises(ShardError, match="u-00002.arrow is listed in .*index.json but missing"):
        open_shards(folder)


def test_unlisted_shard_is_read_from_its_metadata_and_bad_ids_refused(folder):
    write_index(folder.parent, sorted(folder.glob("*.arrow")))
    write_shard(folder / "u-99999.arrow", [{"tokens": np.full(256, 9000, np.uint16), "n_images": 1, "kind": "image", "id": "bad"}])
    with pytest.raises(ShardError, match="u-99999.arrow holds token id 9000"):
        open_shards(folder)


def test_older_shards_without_counts_give_the_same_windows(tmp_path):
    new, old = tmp_path / "new", tmp_path / "old"
    for s in range(3):
        write_shard(new / f"u-{s}.arrow", rows_for(s, 6))
        old.mkdir(exist_ok=True)
        write_legacy(old / f"u-{s}.arrow", rows_for(s, 6))
    assert read_recorded_stats(old / "u-0.arrow") is None
    a, b = open_shards(new), open_shards(old)
    assert b.scanned == 3 and a.scanned == 0
    for mode in ("concat", "sentence"):
        wa, wb = SourceWindows(a, 700, mode, 1), SourceWindows(b, 700, mode, 1)
        assert wa.per_epoch == wb.per_epoch
        for i in range(wa.per_epoch * 2):
            assert all(np.array_equal(x, y) for x, y in zip(wa.window(i), wb.window(i), strict=True) if x is not None)
    write_legacy(old / "u-9.arrow", [{"tokens": np.full(256, 8192, np.uint16), "n_images": 1, "kind": "image", "id": "x"}])
    with pytest.raises(ShardError, match="u-9.arrow holds token id 8192"):
        open_shards(old)


def test_verify_data_reads_what_the_cheap_check_trusts(folder):
    f = folder / "u-00001.arrow"
    data = bytearray(f.read_bytes())
    rows = rows_for(1, 6)
    at = bytes(data).find(rows[2]["tokens"][:8].tobytes())
    assert at > 0
    data[at : at + 2] = np.array([8999], np.uint16).tobytes()  # same size, same recorded counts
    f.write_bytes(bytes(data))
    shards = open_shards(folder)  # counts are trusted
    assert len(shards) == 18
    with pytest.raises(ShardError, match="u-00001.arrow does not match its recorded counts: max_token 8999"):
        open_shards(folder, verify=True)
    open_shards(folder, verify=True, rank=0, world=2)  # rank 0 verifies shards 0 and 2 only
    with pytest.raises(ShardError, match="u-00001.arrow"):
        open_shards(folder, verify=True, rank=1, world=2)


def test_truncated_shard_is_named(folder):
    f = folder / "u-00002.arrow"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ShardError, match="u-00002.arrow"):
        open_shards(folder)


def test_many_shards_are_opened_by_reader_threads(tmp_path):
    rng = np.random.default_rng(0)
    for s in range(300):  # more than one part of 256: the threaded path
        write_shard(tmp_path / f"s-{s:04d}.arrow", [{"tokens": rng.integers(0, 8192, 256, dtype=np.uint16), "n_images": 1,
                                                     "kind": "image", "id": str(s)}])
    shards = open_shards(tmp_path)
    assert shards.n_shards == 300 and len(shards) == 300 and shards.max_token.max() < 8192
    w = SourceWindows(shards, 258 * 4, "sentence", 0)
    assert w.per_epoch == 300  # packing is per shard: a window never mixes shards
    assert sorted(w.bin_sentences(1, p)[0] for p in range(300)) == list(range(300))
    c = SourceWindows(shards, 258 * 4, "concat", 0)
    assert c.per_epoch == 75 and sorted(c.read_position(0, i) for i in range(75)) == list(range(75))


def test_short_reads_go_on_until_every_byte_is_read(folder, monkeypatch):
    """Lustre/NFS may return fewer bytes than asked from one pread with the rest still to come: the read goes on
    from where it stopped. Only a read that returns nothing (end of file) before the end is a truncated shard."""
    import os

    real = os.preadv
    sizes = []

    def short(fd, buffers, offset):  # a stand-in that returns at most 7 bytes per call (an odd count: half a token)
        (buf,) = buffers
        view = memoryview(buf).cast("B")
        sizes.append(min(7, len(view)))
        return real(fd, [view[: sizes[-1]]], offset)

    shard = open_shards(folder).shard(1)
    want = np.array(shard.values[10:300])
    monkeypatch.setattr(os, "preadv", short)
    got = shard.read(10, 300)
    assert np.array_equal(got, want) and len(sizes) == -(-2 * 290 // 7)
    calls = []

    def ends_early(fd, buffers, offset):  # 7 bytes, then end of file
        calls.append(offset)
        return short(fd, buffers, offset) if len(calls) == 1 else 0

    monkeypatch.setattr(os, "preadv", ends_early)
    with pytest.raises(ShardError, match=r"u-00001.arrow: short read at token 10 \(7 of 580 bytes\)"):
        shard.read(10, 300)
    assert len(calls) == 2


def test_start_up_stats_no_shard_and_parses_the_index_once(tmp_path, monkeypatch):
    """At start-up (open_data, the windows, the loader's first batch) a rank lists each folder once, parses
    index.json once for train and val, and stats no shard: on a parallel file system a stat is a request to the
    metadata server, times every shard, times every rank. Only the shards a window reads are opened."""
    import glob
    import os
    import pathlib

    from lvm.data.mixture import DistributedLoader
    from lvm.data.shards import index, shard_set
    from lvm.data.shards import shard as shard_file
    from lvm.train.data_setup import build_windows, open_data

    out = tmp_path / "out"
    rng = np.random.default_rng(0)
    rows = [{"tokens": rng.integers(0, 8192, 256 * (1 + i % 3), dtype=np.uint16), "n_images": 1 + i % 3,
             "kind": "image", "id": str(i)} for i in range(4)]
    files = []
    for split, n in (("train", 60), ("val", 4)):
        for u in range(n):
            files.append(out / split / f"u{u:03d}-00000.arrow")
            write_shard(files[-1], rows)
    entries = [{"path": f"{f.parent.name}/{f.name}", **read_recorded_stats(f), "bytes": f.stat().st_size} for f in files]
    (out / "index.json").write_text(json.dumps({"format": "lvm-shards/2", "shards": entries}))
    (out / "tokenizer.json").write_text(json.dumps({"spec": "vqgan:/models/lvm-vqgan", "codebook_size": 8192,
                                                    "tokens_per_image": 256, "image_size": 256}))
    calls = {"stat": 0, "glob": 0, "scandir": 0, "parse": 0, "open": 0}
    shard_stats = []

    def counted(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            if name == "stat" and str(a[0]).endswith(".arrow"):
                shard_stats.append(str(a[0]))
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(os, "stat", counted("stat", os.stat))
    monkeypatch.setattr(os, "lstat", counted("stat", os.lstat))
    monkeypatch.setattr(os, "scandir", counted("scandir", os.scandir))
    monkeypatch.setattr(glob, "glob", counted("glob", glob.glob))
    monkeypatch.setattr(glob, "iglob", counted("glob", glob.iglob))
    monkeypatch.setattr(pathlib.Path, "glob", counted("glob", pathlib.Path.glob))
    monkeypatch.setattr(index, "parse_index", counted("parse", index.parse_index))
    monkeypatch.setattr(shard_set, "read_recorded_stats", counted("open", shard_set.read_recorded_stats))
    monkeypatch.setattr(shard_file, "_map", counted("open", shard_file._map))
    for mode in ("concat", "sentence"):
        calls.update(stat=0, glob=0, scandir=0, parse=0, open=0)
        shard_stats.clear()
        sources, _ = open_data(str(out), rank=1, world=2)
        loader = DistributedLoader(build_windows(sources, 512, mode, 0, None), 2, rank=1, world_size=2)
        loader.next_batch()
        assert sources[0].train.n_shards == 60 and sources[0].val.n_shards == 4
        assert calls["glob"] == 0 and calls["scandir"] == 2 and calls["parse"] == 1, (mode, calls)
        assert shard_stats == [], (mode, shard_stats)  # folders, tokenizer.json, index.json only
        assert 1 <= calls["open"] <= 4, (mode, calls)  # the shards of this rank's two windows (each may span two)


def test_index_columns_mirror_index_json_and_yield_to_a_changed_one(folder):
    """make_shards writes index.json's shard entries as columns too (index.feather): read instead of parsing the JSON
    (the same counts), and ignored once index.json no longer is the one they mirror."""
    from lvm.data.shards import index

    files = sorted(folder.glob("*.arrow"))
    write_index(folder.parent, files)
    from_json = index.parse_index(folder.parent / "index.json")
    index.write_index_table(folder.parent / "index.json", json.loads((folder.parent / "index.json").read_text())["shards"])
    assert index._read_index_table(folder.parent / "index.json") is not None
    assert index.parse_index(folder.parent / "index.json") == from_json
    a = open_shards(folder)
    assert len(a) == 18 and a.kind_counts.sum() == 18 and not list(folder.glob("index*"))
    write_index(folder.parent, files[:2])  # index.json written again: the columns mirror the old one
    assert index._read_index_table(folder.parent / "index.json") is None
    assert set(next(iter(index.parse_index(folder.parent / "index.json").values()))) == {f.name for f in files[:2]}
