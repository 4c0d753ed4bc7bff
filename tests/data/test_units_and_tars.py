"""Inputs at corpus scale: webdataset tars, patterns, manifest parts, ranks, fit-once, LVM token files."""

import base64
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from lvm.data.offline.config import BuildConfig
from lvm.data.offline.decode import decoded_stream
from lvm.data.offline.pipeline import build_shards
from lvm.data.offline.sources import Skip
from lvm.data.offline.units import InputError, expand_spec, plan_units, read_lines
from lvm.data.shards.format import read_shard
from tests.conftest import scene, write_mp4

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "data_prep" / "make_shards.py"
LVM_JSONL = REPO / "data_prep" / "lvm_jsonl.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"):
    ENV.pop(k, None)


def encoded(seed: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    scene(seed, (200, 150)).save(buf, format=fmt)
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                add(tar, f"{key}.{ext}", data)


def meta(key: str) -> bytes:
    return json.dumps({"key": key, "caption": "a scene", "status": "success"}).encode()


@pytest.fixture(scope="module")
def tars(tmp_path_factory) -> dict:
    """Four img2dataset-style tars (JPEG/PNG/WebP, broken members), a truncated tar, a non-tar, a hole."""
    d = tmp_path_factory.mktemp("laion")
    fmts = ["JPEG", "PNG", "WEBP"]
    good = {}
    for t in range(3):
        samples = []
        for i in range(6):
            key = f"{t:05d}{i:04d}"
            fmt = fmts[(t + i) % 3]
            ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
            samples.append((key, {ext: encoded(100 * t + i, fmt), "json": meta(key), "txt": b"a scene"}))
        if t == 0:
            samples.append(("000000090", {"jpg": encoded(7, "JPEG")[:300], "json": meta("x")}))  # corrupt member
            samples.append(("000000091", {"png": b"not an image at all", "txt": b"x"}))         # not an image
            samples.append(("000000092", {"json": meta("y"), "txt": b"no image"}))               # no image
        write_tar(d / f"{t:05d}.tar", samples)
        good[f"{t:05d}.tar"] = [k for k, m in samples if not k.startswith("00000009")]
    # 00003.tar: cut in the middle of its 4th sample's image; the first 3 samples are whole
    samples = [(f"0003{i:04d}", {"jpg": encoded(300 + i, "JPEG"), "json": meta(str(i))}) for i in range(6)]
    write_tar(d / "full3.tar", samples)
    raw = (d / "full3.tar").read_bytes()
    with tarfile.open(d / "full3.tar") as tf:
        cut_member = [m for m in tf.getmembers() if m.name == "00030003.jpg"][0]
    (d / "00003.tar").write_bytes(raw[: cut_member.offset_data + cut_member.size // 2])
    (d / "full3.tar").unlink()
    good["00003.tar"] = [f"0003{i:04d}" for i in range(3)]
    (d / "00004.tar").write_bytes(b"this is not a tar archive, just text" * 40)
    # 00005.tar is missing: a hole in the range
    return {"dir": d, "good": good}


def ids_and_tokens(out: Path) -> dict[str, np.ndarray]:
    rows = {}
    for f in sorted(out.rglob("*.arrow")):
        t = read_shard(f)
        for sid, toks in zip(t.column("id").to_pylist(), t.column("tokens").to_pylist(), strict=True):
            rows[sid] = np.asarray(toks)
    return rows


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".parts" not in p.parts}


def make(args: list[str], env=None, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, str(SCRIPT), *args, "--no-progress"], capture_output=True, text=True,
                       env=env or ENV, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_expand_spec_braces_globs_folders(tars, tmp_path):
    d = tars["dir"]
    assert [Path(f).name for f in expand_spec(f"{d}/{{00000..00002}}.tar")] == ["00000.tar", "00001.tar", "00002.tar"]
    assert [Path(f).name for f in expand_spec(f"{d}/*.tar")] == [f"{i:05d}.tar" for i in range(5)]
    assert [Path(f).name for f in expand_spec(f"{d}/0000{{1,3}}.tar")] == ["00001.tar", "00003.tar"]
    assert [Path(f).name for f in expand_spec(str(d))] == [f"{i:05d}.tar" for i in range(5)]  # a folder of tars
    assert Path(expand_spec(f"{d}/{{00004..00005}}.tar")[1]).name == "00005.tar"  # a hole stays, reported later
    with pytest.raises(InputError, match="matches no file"):
        expand_spec(f"{d}/*.nothing")
    with pytest.raises(InputError, match="no such file"):
        expand_spec(str(tmp_path / "absent.jsonl"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for sub in ("a", "b"):
        (tmp_path / sub / "00000.tar").write_bytes(b"")
    names = [u.name for u in plan_units([f"{tmp_path}/{{a,b}}/00000.tar"])]
    assert names == ["a__00000", "b__00000"]  # same file name in two folders: told apart


def stream_ids(units) -> list[str]:
    """Sentence ids (of samples and of skipped samples) make_shards gives the units' tars, in order."""
    cfg = BuildConfig(workers=0)
    return [it.sentence if isinstance(it, Skip) else it[0].id for u in units for it in decoded_stream(u, cfg, None)]


def test_same_tar_names_in_two_folders_give_distinct_sample_ids(tmp_path):
    """laion/00000.tar and coyo/00000.tar (img2dataset numbers every output from 00000): a sample id keeps the tar's
    path below the inputs' common folder, so the two never collide (in the shards, the split and the report)."""
    for sub in ("laion", "coyo"):
        (tmp_path / sub).mkdir()
        write_tar(tmp_path / sub / "00000.tar", [("000000000", {"jpg": encoded(1, "JPEG")}), ("000000001", {"txt": b"x"})])
    units = plan_units([f"{tmp_path}/{{laion,coyo}}/*.tar"])
    assert stream_ids(units) == ["laion/00000.tar/000000000", "laion/00000.tar/000000001",
                                 "coyo/00000.tar/000000000", "coyo/00000.tar/000000001"]
    # one folder of tars (or one tar): the tar's file name, as before
    assert stream_ids(plan_units([f"{tmp_path}/coyo/*.tar"])) == ["00000.tar/000000000", "00000.tar/000000001"]


def test_gzipped_tars_are_read_as_a_stream(tmp_path):
    samples = [(f"0000{i:05d}", {"jpg": encoded(10 + i, "JPEG"), "json": meta(str(i))}) for i in range(4)]
    write_tar(tmp_path / "00000.tar", samples)
    raw = (tmp_path / "00000.tar").read_bytes()
    (tmp_path / "00000.tar").unlink()
    import gzip

    (tmp_path / "00001.tar.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "00002.tgz").write_bytes(gzip.compress(raw))
    (tmp_path / "00003.tar.gz").write_bytes(gzip.compress(raw)[: len(gzip.compress(raw)) * 3 // 5])  # cut mid-stream
    assert [Path(f).name for f in expand_spec(str(tmp_path))] == ["00001.tar.gz", "00002.tgz", "00003.tar.gz"]
    units = plan_units([str(tmp_path)], part_bytes=100)  # a tar is never cut into parts
    assert [(u.name, u.kind) for u in units] == [("00001", "tar"), ("00002", "tar"), ("00003", "tar")]
    ids = stream_ids(units)
    keys = [k for k, _ in samples]
    assert ids[:8] == [f"00001.tar.gz/{k}" for k in keys] + [f"00002.tgz/{k}" for k in keys]
    cut = list(decoded_stream(units[2], BuildConfig(workers=0), None))
    assert all(not isinstance(x, Skip) for x in cut[:-1]) and 0 < len(cut) - 1 < 4  # the whole samples before the cut
    assert isinstance(cut[-1], Skip) and "tar truncated or corrupt" in cut[-1].reason


def test_webdataset_tars_good_kept_bad_reported(tars, small_tokenizer, tmp_path):
    d, out = tars["dir"], tmp_path / "out"
    r = make(["--input", f"{d}/{{00000..00005}}.tar", "--out", str(out), "--tokenizer", f"patch-kmeans:{small_tokenizer}",
              "--workers", "2", "--val-fraction", "0.2", "--batch-size", "5"])
    assert "from 6 units" in r.stdout
    rows = ids_and_tokens(out)
    want = {f"{tar}/{k}" for tar, keys in tars["good"].items() for k in keys}
    assert set(rows) == want  # every whole sample, including those before the cut of 00003.tar
    assert all(len(t) == 256 for t in rows.values())
    report = json.loads((out / "report.json").read_text())
    by = {(Path(s["source"]).name, s.get("key")): s["reason"] for s in report["skipped"]}
    assert "jpg member: corrupt or truncated image" in by[("00000.tar", "000000090")]
    assert "png member: not an image" in by[("00000.tar", "000000091")]
    assert "no image member" in by[("00000.tar", "000000092")] and "json, txt" in by[("00000.tar", "000000092")]
    assert "tar truncated" in by[("00003.tar", "00030003")]
    assert "not a tar file" in by[("00004.tar", None)]
    assert by[("00005.tar", None)] == "file not found"
    assert report["skipped_count"] == 6
    index = json.loads((out / "index.json").read_text())
    assert index["format"] == "lvm-shards/2" and index["units"] == 6
    for s in index["shards"]:
        t = read_shard(out / s["path"])
        toks = t.column("tokens").combine_chunks().values.to_numpy()
        assert s["sentences"] == len(t) and s["tokens"] == len(toks) and s["max_token"] == int(toks.max())
        assert s["kinds"] == {"image": len(t)} and Path(s["path"]).name.split("-")[0] in {f"{i:05d}" for i in range(4)}


def test_two_ranks_plus_index_equal_one_run(tars, mixed_corpus, small_tokenizer, tmp_path):
    d = tars["dir"]
    common = ["--input", f"{d}/0000[0-3].tar", "--input", str(mixed_corpus["manifest"]), "--tokenizer",
              f"patch-kmeans:{small_tokenizer}", "--workers", "0", "--val-fraction", "0.2", "--sentences-per-shard", "4"]
    make([*common, "--out", str(tmp_path / "one")])
    for rank in (0, 1):
        r = make([*common, "--out", str(tmp_path / "two")], env={**ENV, "RANK": str(rank), "WORLD_SIZE": "2"})
        assert "rank done" in r.stdout
        assert not (tmp_path / "two" / "index.json").exists()  # rank 0 cannot index before rank 1's units exist
    make([*common, "--out", str(tmp_path / "two"), "--index-only"])
    assert tree_bytes(tmp_path / "one") == tree_bytes(tmp_path / "two")


def test_slurm_array_slices_cover_every_unit_once():
    from lvm.launch_env import work_slice

    seen = []
    for task in range(3, 9, 2):  # --array=3-7:2 with 2 tasks per array element
        for proc in range(2):
            env = {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_STEP": "2",
                   "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_PROCID": str(proc), "SLURM_NTASKS": "2"}
            seen.append(work_slice(env))
    assert sorted(seen) == [(r, 6) for r in range(6)]


def test_fit_once_then_ranks_only_load(tmp_path):
    from lvm.data.synth import CorpusSize, make_corpus

    manifest = make_corpus(tmp_path / "c", seed=3, size=CorpusSize(videos=1, gifs=0, sequences=1, frames=4, pairs_per_task=2, images=6))
    out = tmp_path / "s"
    base = ["--input", str(manifest), "--out", str(out), "--workers", "0", "--fit-images", "24"]
    r = make(base, env={**ENV, "RANK": "1", "WORLD_SIZE": "2"}, check=False)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith(f"error: no fitted tokenizer in {out / 'tokenizer'}")
    r = make([*base, "--fit-only"])
    assert "tokenizer ready" in r.stdout and (out / "tokenizer" / "config.json").is_file()
    assert not list(out.rglob("*.arrow"))
    codebook = (out / "tokenizer" / "codebook.safetensors").read_bytes()
    for rank in (0, 1):
        make(base, env={**ENV, "RANK": str(rank), "WORLD_SIZE": "2"})
    make([*base, "--index-only"])
    assert (out / "tokenizer" / "codebook.safetensors").read_bytes() == codebook
    single = tmp_path / "single"
    make(["--input", str(manifest), "--out", str(single), "--workers", "0", "--fit-images", "24"])
    assert (single / "tokenizer" / "codebook.safetensors").read_bytes() == codebook  # the same sample, the same fit
    assert tree_bytes(single) == tree_bytes(out)


def test_manifest_parts_read_every_line_once(tmp_path, mixed_corpus, small_tokenizer):
    manifest = mixed_corpus["manifest"]
    lines = manifest.read_bytes().splitlines(keepends=True)
    for part in (7, 64, 200, 10**9):
        units = plan_units([str(manifest)], part_bytes=part)
        got = [raw for u in units for _, _, raw in read_lines(u)]
        assert got == lines, part
    out = tmp_path / "parts"
    cfg = dict(tokenizer=f"patch-kmeans:{small_tokenizer}", workers=0, val_fraction=0.2, progress=False)
    build_shards(BuildConfig(inputs=[str(manifest)], out=str(out), part_bytes=300, **cfg))
    build_shards(BuildConfig(inputs=[str(manifest)], out=str(tmp_path / "whole"), **cfg))
    parts, whole = ids_and_tokens(out), ids_and_tokens(tmp_path / "whole")
    assert parts.keys() == whole.keys() and all(np.array_equal(parts[k], whole[k]) for k in whole)
    assert len(json.loads((out / "index.json").read_text())["shards"]) > 3
    malformed = [s for s in json.loads((out / "report.json").read_text())["skipped"] if "malformed" in s["reason"]]
    assert len(malformed) == 3 and all("line" in s or "offset" in s for s in malformed)


def test_long_video_is_decoded_once(tmp_path, monkeypatch):
    import lvm.data.offline.decode as decode
    from lvm.data.offline.sources.manifest import read_manifest

    write_mp4(tmp_path / "long.mp4", 40)
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "v", "kind": "video", "video": "long.mp4", "max_frames": 64}) + "\n")
    chunks = read_manifest(tmp_path / "m.jsonl").sentences
    assert [c.id for c in chunks] == ["v#0", "v#1", "v#2", "v#3"]
    separately = [decode.decode_sentence(c) if c.frame_offset < 40 else None for c in chunks]
    calls = []
    real = decode._video_frames_av
    monkeypatch.setattr(decode, "_video_frames_av", lambda *a: calls.append(a[2]) or real(*a))
    together = decode.decode_line(chunks, "squash")
    assert len(calls) == 1 and calls[0] == 64  # one pass, up to the last wanted frame
    assert [None if x is None else x.shape[0] for x in together] == [16, 16, 8, None]
    for a, b in zip(separately, together, strict=True):
        assert (a is None and b is None) or np.array_equal(a, b)


def lvm_line(codes) -> str:
    return json.dumps({"tokens": base64.b64encode(np.asarray(codes, "<i4").tobytes()).decode()})


def test_lvm_token_files_round_trip_and_bad_lines(tmp_path):
    rng = np.random.default_rng(0)
    good = [rng.integers(0, 8192, 256 * n) for n in (16, 1, 4, 16, 2)]
    (tmp_path / "a.jsonl").write_text("\n".join(lvm_line(c) for c in good[:3]) + "\n")
    bad = [lvm_line(rng.integers(0, 8192, 100)), lvm_line([8192] * 256), '{"tokens": "***"}', "not json", lvm_line([])]
    (tmp_path / "b.jsonl").write_text("\n".join([lvm_line(good[3]), *bad, lvm_line(good[4])]) + "\n")
    out = tmp_path / "shards"
    r = subprocess.run([sys.executable, str(LVM_JSONL), "import", "--jsonl", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"),
                        "--kind", "video", "--out", str(out), "--tokenizer-spec", "vqgan:/models/lvm-vqgan", "--val-fraction", "0",
                        "--no-progress"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert sorted((Path(s["source"].rsplit(":", 1)[0]).name, s["line"]) for s in report["skipped"]) == [("b.jsonl", n) for n in range(2, 7)]
    assert any("not a positive multiple of 256" in s["reason"] for s in report["skipped"])
    assert any("outside 0..8191" in s["reason"] for s in report["skipped"])
    info = json.loads((out / "tokenizer.json").read_text())
    assert info["spec"] == "vqgan:/models/lvm-vqgan" and info["codebook_size"] == 8192
    t = read_shard(out / "train" / "a-00000.arrow")
    assert t.column("kind").to_pylist() == ["video"] * 3 and t.column("n_images").to_pylist() == [16, 1, 4]
    assert t.column("id").to_pylist() == ["a.jsonl:1", "a.jsonl:2", "a.jsonl:3"]
    back = tmp_path / "back.jsonl"
    r = subprocess.run([sys.executable, str(LVM_JSONL), "export", "--shards", str(out), "--out", str(back)],
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    from lvm.data.offline.sources.lvm_jsonl import decode_line

    lines = back.read_text().splitlines()
    assert len(lines) == len(good) and all(np.array_equal(decode_line(x), g) for x, g in zip(lines, good, strict=True))
    assert lines[:3] == (tmp_path / "a.jsonl").read_text().splitlines()  # byte-identical in LVM's format
    # re-import of the export finds its tokenizer.json beside it
    r = subprocess.run([sys.executable, str(LVM_JSONL), "import", "--jsonl", str(back), "--kind", "video", "--out",
                        str(tmp_path / "again"), "--no-progress"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "again" / "tokenizer.json").read_text()) == info
    r = subprocess.run([sys.executable, str(LVM_JSONL), "import", "--jsonl", str(tmp_path / "a.jsonl"), "--kind", "video",
                        "--out", str(tmp_path / "x")], capture_output=True, text=True, env=ENV)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "--tokenizer-spec" in r.stderr


def test_lvm_token_bad_lines_are_named_by_file_line_in_every_part(tmp_path):
    """A large LVM token file is cut into byte-range parts (64 MiB; 2 KB here): a bad line in any part is reported
    with its line number in the file, not counted from the start of its part."""
    from lvm.data.offline.pipeline import import_token_files

    rng = np.random.default_rng(1)
    lines = [lvm_line(rng.integers(0, 8192, 256)) for _ in range(30)]
    bad_at = [2, 9, 10, 17, 29]  # 1-based file line numbers
    for n in bad_at:
        lines[n - 1] = "not json" if n % 2 else lvm_line([9000] * 256)
    (tmp_path / "big.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "shards"
    assert len(plan_units([str(tmp_path / "big.jsonl")], part_bytes=2048)) > 5
    import_token_files([str(tmp_path / "big.jsonl")], "video", str(out), "vqgan:/models/lvm-vqgan", part_bytes=2048,
                       val_fraction=0, progress=False)
    skipped = json.loads((out / "report.json").read_text())["skipped"]
    assert sorted(s["line"] for s in skipped) == bad_at
    assert sorted(s["source"] for s in skipped) == sorted(f"{tmp_path / 'big.jsonl'}:{n}" for n in bad_at)
    assert sum(read_shard(f).num_rows for f in out.rglob("*.arrow")) == 30 - len(bad_at)


def test_manifest_parts_number_lines_in_the_file(tmp_path):
    """Every line of a manifest cut into byte-range parts carries its line number in the file: lines without an
    'id' get distinct default ids (`line<N>`, as in the whole file), and a malformed line in any part is
    reported as `path:N`, whatever the part size."""
    from lvm.data.offline.sources.manifest import iter_manifest_lines

    lines = []
    for n in range(1, 41):
        if n in (7, 23, 38):
            lines.append("{not json")
        elif n % 5 == 0:
            lines.append("")  # blank lines count as lines of the file
        else:
            lines.append(json.dumps({"kind": "image", "images": [f"img/{n}.png"]}))
    manifest = tmp_path / "big.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    want_ids = [f"line{n}" for n in range(1, 41) if n not in (7, 23, 38) and n % 5]
    for part in (64, 100, 333, 10**9):
        units = plan_units([str(manifest)], part_bytes=part)
        assert part == 10**9 or len(units) > 3
        ids, skips = [], []
        for u in units:
            for item in iter_manifest_lines(read_lines(u), manifest):
                (skips.append(item) if isinstance(item, Skip) else ids.extend(s.id for s in item))
        assert ids == want_ids, part
        assert [(s.source, s.line) for s in skips] == [(f"{manifest}:{n}", n) for n in (7, 23, 38)], part
        assert [n for u in units for n, _, _ in read_lines(u)] == list(range(1, 41)), part
