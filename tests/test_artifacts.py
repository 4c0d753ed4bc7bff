"""One definition of "the same tokenizer" (lvm.artifacts.TokenizerRecord): what the tokenizer is, never how
its folder was spelled. Real shards made by make_shards (lvm.data.offline) on a few images."""

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import scene


def build(manifest: Path, out: Path, tokenizer: str) -> Path:
    from lvm.data.offline.config import BuildConfig
    from lvm.data.offline.pipeline import build_shards

    build_shards(BuildConfig(inputs=[str(manifest)], out=str(out), tokenizer=tokenizer, workers=0, val_fraction=0.4,
                             sentences_per_shard=4, fit_images=8, progress=False))
    return out


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A: `make shards` fitting A/tokenizer; B: TOKENIZER=patch-kmeans:A/tokenizer (relative to the current
    folder); C: the same folder spelled as an absolute path that is not normalised."""
    root = tmp_path_factory.mktemp("same_tok")
    for i in range(8):
        scene(200 + i).save(root / f"img{i}.png")
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"im{i}", "kind": "image", "images": [f"img{i}.png"]}) + "\n"
                                for i in range(8)))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        a = build(manifest, root / "A", "patch-kmeans")
        b = build(manifest, root / "B", "patch-kmeans:A/tokenizer")
        c = build(manifest, root / "C", f"patch-kmeans:{root}/B/../A/tokenizer")
    return {"root": root, "manifest": manifest, "A": a, "B": b, "C": c}


def test_sources_of_one_tokenizer_spelled_differently_train_together(made, tmp_path, monkeypatch):
    from lvm.artifacts import TokenizerRecord
    from lvm.train.data_setup import check_tokenizer, resolve_sources

    monkeypatch.chdir(tmp_path)  # somewhere else: nothing may depend on the folder make_shards ran in
    a, b, c = made["A"], made["B"], made["C"]
    assert json.loads((a / "tokenizer.json").read_text())["spec"] == "patch-kmeans:tokenizer"
    sources, info = resolve_sources([str(a), str(b), str(c)], None)
    assert [s.name for s in sources] == ["A", "B", "C"]
    assert info["spec_resolved"] == f"patch-kmeans:{(a / 'tokenizer').resolve()}"
    for shards in (b, c):  # generation and evaluation: the same tokenizer, and it loads
        assert TokenizerRecord.from_info(check_tokenizer(shards / "train", None)).mismatch(TokenizerRecord.from_info(info)) is None
        tok = TokenizerRecord.from_shards(shards / "train").load()
        assert tok.centroids.equal(TokenizerRecord.from_shards(a / "train").load().centroids)


def test_lvm_jsonl_export_and_import_keep_the_tokenizer(made, tmp_path, monkeypatch):
    from lvm.data.offline.pipeline import import_token_files
    from lvm.data.offline.sources.lvm_jsonl import export_token_file
    from lvm.train.data_setup import resolve_sources

    root, a = made["root"], made["A"]
    export_token_file(str(made["B"]), str(tmp_path / "b.jsonl"), split="train")
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "D"  # from the export's sidecar
    import_token_files([str(tmp_path / "b.jsonl")], "image", str(d), val_fraction=0.0, progress=False)
    monkeypatch.chdir(root)
    e = tmp_path / "E"  # --tokenizer-spec relative to the current folder
    import_token_files([str(tmp_path / "b.jsonl")], "image", str(e), "patch-kmeans:A/tokenizer", val_fraction=0.0,
                       progress=False)
    monkeypatch.chdir(tmp_path)
    resolve_sources([str(a), str(d), str(e)], None)


def test_another_tokenizer_is_refused(made, small_tokenizer, tmp_path):
    from lvm.data.shards.format import ShardError
    from lvm.train.data_setup import resolve_sources

    a = made["A"]
    other = build(made["manifest"], tmp_path / "other", f"patch-kmeans:{small_tokenizer}")
    with pytest.raises(ShardError, match="same tokenizer"):
        resolve_sources([str(a), str(other)], None)
    # a copy of A with its tokenizer folder is the same tokenizer; fitted again in place, it no longer is
    copy = tmp_path / "copy"
    shutil.copytree(a, copy)
    resolve_sources([str(a), str(copy)], None)
    shutil.copy(small_tokenizer / "codebook.safetensors", copy / "tokenizer" / "codebook.safetensors")
    with pytest.raises(ShardError, match="changed after the tokens were made"):
        resolve_sources([str(a), str(copy)], None)


def old_style(info: dict, spec: str) -> dict:
    """tokenizer.json as versions before the digest wrote it: no digest, the spec inside `details` too."""
    return {**{k: v for k, v in info.items() if k != "digest"}, "spec": spec, "details": {**info["details"], "spec": spec}}


def test_older_tokenizer_json_without_a_digest(made, tmp_path):
    from lvm.artifacts import TokenizerRecord
    from lvm.data.shards.format import ShardError
    from lvm.train.data_setup import resolve_sources

    a = made["A"]
    info = json.loads((a / "tokenizer.json").read_text())
    assert info["digest"].startswith("sha256:") and "spec" not in info["details"]
    old = tmp_path / "old"  # its folder is here: the digest is taken from it
    shutil.copytree(a, old)
    (old / "tokenizer.json").write_text(json.dumps(old_style(info, "patch-kmeans:tokenizer")))
    resolve_sources([str(a), str(old)], None)
    rec = TokenizerRecord.from_shards(old)
    assert rec.digest is None and rec.known_digest() == info["digest"]
    assert TokenizerRecord.from_info(rec.with_digest().to_info()).digest == info["digest"]  # what training records

    gone = tmp_path / "gone"  # its folder is gone: the kind, geometry and description decide
    shutil.copytree(a, gone, ignore=shutil.ignore_patterns("tokenizer"))
    (gone / "tokenizer.json").write_text(json.dumps(old_style(info, "patch-kmeans:/nowhere/tokenizer")))
    resolve_sources([str(a), str(gone)], None)
    refit = {**info, "details": {**info["details"], "seed": info["details"]["seed"] + 1}}
    (gone / "tokenizer.json").write_text(json.dumps(old_style(refit, "patch-kmeans:/nowhere/tokenizer")))
    with pytest.raises(ShardError, match="differ in seed"):
        resolve_sources([str(a), str(gone)], None)


def test_record_paths_and_comparison(made, tmp_path):
    from lvm.artifacts import TokenizerRecord, relative_spec, resolve_spec

    a = made["A"]
    assert resolve_spec("patch-kmeans:tokenizer", a) == f"patch-kmeans:{(a / 'tokenizer').resolve()}"
    assert resolve_spec("patch-kmeans", a) == "patch-kmeans"
    assert relative_spec(f"patch-kmeans:{a / 'tokenizer'}", a) == "patch-kmeans:tokenizer"
    assert relative_spec(f"vqgan:{tmp_path / 'v'}", a) == f"vqgan:{(tmp_path / 'v').resolve()}"
    rec = TokenizerRecord.from_shards(a / "train")
    assert rec.folder == (a / "tokenizer").resolve() and rec.extra == {"resize": "squash"}
    assert rec.to_info(a) == json.loads((a / "tokenizer.json").read_text())
    run_info = {**rec.to_info(), "spec_resolved": rec.spec}  # a run's tokenizer.json: absolute
    assert TokenizerRecord.from_info(run_info) == rec and TokenizerRecord.from_info(run_info).compatible(rec)
    vq = TokenizerRecord.from_info({**rec.to_info(), "spec": "vqgan:/elsewhere"})
    assert rec.mismatch(vq, "the model's") == "kind patch-kmeans vs the model's vqgan"
    small = TokenizerRecord.from_info({**rec.to_info(), "tokens_per_image": 64})
    assert "tokens_per_image 256" in rec.mismatch(small)


def test_locate_says_what_a_path_is_not(tmp_path):
    """Paths that name no model: one line each, naming the flag. (Real runs and exports:
    tests/train/test_pretrain_runs.py::test_export_matches_engine_logits.)"""
    from lvm.artifacts import CheckpointError, locate

    with pytest.raises(FileNotFoundError, match="--checkpoint .*nope does not exist"):
        locate(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="--resume .*: no run folder, DeepSpeed checkpoint or Hugging Face model"):
        locate(tmp_path, "--resume")
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "latest").write_text("step_00000007")  # a tag removed by hand
    found = locate(tmp_path / "run")
    assert (found.ckpt_dir, found.tag, found.run_dir) == (ckpts, None, None)
    with pytest.raises(CheckpointError, match="latest names a missing tag"):
        found.checkpoint()
    with pytest.raises(CheckpointError, match="not a run folder of launch/pretrain.py"):
        found.window()
