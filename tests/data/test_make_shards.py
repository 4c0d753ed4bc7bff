import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lvm.data.offline.config import BuildConfig
from lvm.data.offline.pipeline import build_shards
from lvm.data.shards.format import read_shard
from lvm.data.shards.shard_set import load_sentences

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "data_prep" / "make_shards.py"


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".parts" not in p.parts}


@pytest.fixture(scope="module")
def mixed_shards(mixed_corpus, small_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    cfg = BuildConfig(inputs=[str(mixed_corpus["manifest"])], out=str(out), tokenizer=f"patch-kmeans:{small_tokenizer}",
                      workers=0, val_fraction=0.2, sentences_per_shard=4, progress=False)
    return out, build_shards(cfg)


def test_shards_are_datasets_readable_uint16(mixed_shards):
    from datasets import Dataset

    out, summary = mixed_shards
    files = sorted((out / "train").glob("*.arrow")) + sorted((out / "val").glob("*.arrow"))
    assert files and (out / "val").is_dir()
    n = 0
    for f in files:
        ds = Dataset.from_file(str(f))
        assert str(ds.features["tokens"].feature.dtype) == "uint16"
        for row in ds:
            assert len(row["tokens"]) == 256 * row["n_images"]
            n += 1
    written = summary["report"]["written"]
    assert n == written["train"]["sentences"] + written["val"]["sentences"]
    info = json.loads((out / "tokenizer.json").read_text())
    assert info["codebook_size"] == 8192 and info["tokens_per_image"] == 256


def test_every_bad_source_is_reported_and_odd_images_are_kept(mixed_shards, mixed_corpus):
    out, _ = mixed_shards
    report = json.loads((out / "report.json").read_text())
    skipped_ids = {s.get("sentence") for s in report["skipped"] if "sentence" in s}
    assert skipped_ids == set(mixed_corpus["bad_ids"])
    assert report["skipped_count"] == mixed_corpus["n_bad_sources"] + mixed_corpus["n_malformed_lines"]
    by_id = {s["sentence"]: s for s in report["skipped"] if "sentence" in s}
    assert by_id["bad-seq"]["source"].endswith("truncated.png")      # the whole sequence was dropped
    assert "decompression bomb" in by_id["bad-bomb.png"]["reason"]
    assert "undecodable" in by_id["bad-video"]["reason"]
    table = load_sentences(out / "train")
    val = load_sentences(out / "val")
    ids = set(table.ids) | set(val.ids)
    assert {f"mode-{n}" for n in mixed_corpus["modes"]} <= ids
    n_images = dict(zip(list(table.ids) + list(val.ids), list(table.n_images) + list(val.n_images), strict=True))
    assert n_images["mp4"] == 7 and n_images["mp4-stride"] == 3 and n_images["gif"] == 5
    assert n_images["long#0"] == 16 and n_images["long#1"] == 4


def test_same_input_same_bytes_whatever_workers(mixed_corpus, small_tokenizer, mixed_shards, tmp_path):
    out0, _ = mixed_shards
    cfg = BuildConfig(inputs=[str(mixed_corpus["manifest"])], out=str(tmp_path / "w2"),
                      tokenizer=f"patch-kmeans:{small_tokenizer}", workers=2, val_fraction=0.2,
                      sentences_per_shard=4, progress=False)
    build_shards(cfg)
    assert tree_bytes(out0) == tree_bytes(tmp_path / "w2")


def test_rerun_with_other_arguments_is_refused(mixed_corpus, small_tokenizer, mixed_shards):
    out, _ = mixed_shards
    cfg = BuildConfig(inputs=[str(mixed_corpus["manifest"])], out=str(out), tokenizer=f"patch-kmeans:{small_tokenizer}",
                      workers=0, val_fraction=0.5, sentences_per_shard=4, progress=False)
    with pytest.raises(SystemExit, match="val_fraction"):
        build_shards(cfg)


def test_fits_embedded_tokenizer_when_none_given(tmp_path):
    from lvm.data.synth import CorpusSize, make_corpus

    manifest = make_corpus(tmp_path / "c", seed=2, size=CorpusSize(videos=1, gifs=0, sequences=1, frames=4, pairs_per_task=2, images=4))
    out = tmp_path / "s"
    r = subprocess.run([sys.executable, str(SCRIPT), "--manifest", str(manifest), "--out", str(out), "--workers", "0",
                        "--fit-images", "32", "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "B/image" in r.stdout
    assert (out / "tokenizer" / "codebook.safetensors").is_file()
    assert json.loads((out / "tokenizer.json").read_text())["spec"] == "patch-kmeans:tokenizer"
    from lvm.artifacts import TokenizerRecord

    tok = TokenizerRecord.from_shards(out / "train").load()
    table = load_sentences(out / "train")
    import torch

    img = tok.decode(torch.from_numpy(table.sentence(0)[:256].astype(np.int64))[None])
    assert img.shape == (1, 3, 256, 256)


def test_cli_errors_are_one_line(tmp_path, small_tokenizer):
    r = subprocess.run([sys.executable, str(SCRIPT), "--manifest", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "bad.jsonl").write_text('{"id": "x", "kind": "image", "images": ["missing.png"]}\n')
    r = subprocess.run([sys.executable, str(SCRIPT), "--manifest", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o2"),
                        "--tokenizer", f"patch-kmeans:{small_tokenizer}", "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 1 and "error: nothing was written" in r.stderr
    assert json.loads((tmp_path / "o2" / "report.json").read_text())["skipped"][0]["reason"] == "file not found"
    r = subprocess.run([sys.executable, str(SCRIPT), "--manifest", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o3"),
                        "--tokenizer", f"patch-kmeans:{tmp_path / 'no_codebook'}"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: tokenizer folder")


def test_sigkill_then_resume_gives_identical_output(mixed_corpus, small_tokenizer, tmp_path):
    from lvm.data.synth import CorpusSize, make_corpus

    manifest = make_corpus(tmp_path / "c", seed=4, size=CorpusSize(videos=2, gifs=1, sequences=6, frames=16, pairs_per_task=16, images=24))
    args = ["--input", str(manifest), "--tokenizer", f"patch-kmeans:{small_tokenizer}", "--workers", "0",
            "--sentences-per-shard", "1", "--batch-size", "16", "--no-progress"]
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(ref)], check=True, capture_output=True)
    n_shards = len(list(ref.rglob("*.arrow")))

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.rglob("*.arrow"))) < 3:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(out.rglob("*.arrow")))
    assert 0 < done_before < n_shards, "the kill must land mid-run"
    assert not (out / "index.json").exists()
    # what a kill during a write leaves (the rename never happened): removed by the rerun
    (out / "train" / ".manifest-00000.arrow.tmp.4242").write_bytes(b"partial")
    r = subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert tree_bytes(out) == tree_bytes(ref)
    assert not [p for p in out.rglob("*") if ".tmp." in p.name], "temporary files of the killed run are left"
    for f in out.rglob("*.arrow"):
        read_shard(f)
