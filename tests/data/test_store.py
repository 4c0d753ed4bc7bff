import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from lvm.data.derive import colorization_input, default_palette, derive_input, label_frame
from lvm.data.store import open_store
from lvm.data.store_build import build_store
from lvm.data.store_records import parse_record_line
from lvm.tokenizer.patch_kmeans import PatchKMeansTokenizer
from lvm.tokenizer.preprocess import load_image, to_pixels
from tests.data.conftest import CountingEncode, store_config
from tests.data.labelled_tree import CATEGORIES, N_DEPTH, N_IMAGES, N_NORMALS

REPO = Path(__file__).resolve().parents[2]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_manifest_lines_become_records(tmp_path):
    root = tmp_path
    r = parse_record_line({"images": ["x.jpg", "y.png", "x2.jpg", "y2.png"], "kind": "pairs", "task": "seg",
                           "label": "segmentation", "dataset": "ade", "id": "s"}, root, 1)
    assert [x.id for x in r] == ["s#0", "s#1"] and r[0].keys == (f"image:{root}/x.jpg", f"segmentation:ade:{root}/y.png")
    (d,) = parse_record_line({"images": ["a.jpg"], "kind": "image", "derive": "inpainting", "id": "a"}, root, 2)
    assert d.kind == "pair" and d.group == "inpainting" and d.keys == (f"inpainting:a:{root}/a.jpg", f"image:{root}/a.jpg")
    (e,) = parse_record_line({"images": ["a.jpg"], "kind": "image", "derive": "inpainting", "id": "b:1%"}, root, 2)
    assert e.keys[0] == f"inpainting:b%3A1%25:{root}/a.jpg"
    (c,) = parse_record_line({"images": ["a.jpg"], "kind": "image", "category": "dog"}, root, 3)
    assert (c.kind, c.group, c.id) == ("image", "dog", "line3")
    for bad, why in [({"images": ["a.jpg"], "kind": "image", "derive": "blur"}, "derive"),
                     ({"images": ["a", "b"], "kind": "pairs", "label": "edges"}, "label"),
                     ({"images": ["a"], "kind": "image", "task": "seg"}, "pairs"),
                     ({"video": "v.mp4", "kind": "video"}, "video line"),
                     ({"images": ["a", "b", "c"], "kind": "pairs"}, "even")]:
        with pytest.raises(ValueError, match=why):
            parse_record_line(bad, root, 4)


def test_store_holds_every_record_with_its_links(store):
    out, summary, _ = store
    idx = summary["index"]
    assert idx["tasks"] == {"segmentation": N_IMAGES - 1, "depth": N_DEPTH, "normals": N_NORMALS,
                            "colorization": N_IMAGES + 1, "inpainting": N_IMAGES + 1}
    assert idx["categories"] == CATEGORIES
    report = json.loads((out / "report.json").read_text())
    assert [(s["sentence"], "truncated" in s["reason"]) for s in report["skipped"]] == [("segmentation/training/img07", True)]
    s = open_store(out)
    keys = s.keys()
    assert len(keys) == len(set(keys)) == idx["images"]
    pair = [i for i, k in enumerate(s.kinds) if k == "pair" and s.groups[i] == "colorization"][0]
    assert keys[s.first[pair]].startswith("colorization:") and keys[s.second[pair]] == "image:" + keys[s.first[pair]].split(":", 1)[1]
    images = pa.ipc.open_file(pa.memory_map(str(next((out / "images").glob("*.arrow"))))).read_all()
    assert images.schema.field("tokens").type == pa.list_(pa.uint16(), 256)


def test_encoder_runs_once_per_distinct_image(store):
    out, summary, counter = store
    rows, failed = summary["index"]["images"], summary["index"]["failed_images"]
    # the broken annotation keeps its row (zero tokens) and is not encoded
    assert len(failed) == 1 and open_store(out).keys()[failed[0]].endswith("annotations/training/img07.png")
    # every image of the folder, each label map, each derived input: once, however many records share it
    assert rows - 1 == (N_IMAGES + 1) + (N_IMAGES - 1) + N_DEPTH + N_NORMALS + 2 * (N_IMAGES + 1) + sum(CATEGORIES.values())
    assert counter.images == rows - 1


def test_an_image_shared_across_units_is_encoded_once(labelled, small_tokenizer, tmp_path, monkeypatch):
    img, label = str(labelled / "images/training/img00.jpg"), str(labelled / "annotations/training/img00.png")
    (tmp_path / "u1.jsonl").write_text(json.dumps({"images": [img], "kind": "image", "category": "x", "id": "a"}) + "\n")
    (tmp_path / "u2.jsonl").write_text(
        json.dumps({"images": [f"{labelled}/images/../images/training/img00.jpg", label], "kind": "pairs", "task": "seg",
                    "label": "segmentation", "id": "b"}) + "\n"
        + json.dumps({"images": [img], "kind": "image", "derive": "colorization", "id": "c"}) + "\n")
    counter = CountingEncode(monkeypatch)
    cfg = store_config(labelled, tmp_path / "s", small_tokenizer)
    cfg.inputs = [str(tmp_path / "u1.jsonl"), str(tmp_path / "u2.jsonl")]
    idx = build_store(cfg)["index"]
    # img00 (unit 1), its label map and its grey copy (unit 2): three images, each encoded once
    assert idx["unit_images"] == [1, 2] and counter.images == 3
    s = open_store(tmp_path / "s")
    assert s.first.tolist() == [0, 0, 2] and s.second.tolist() == [-1, 1, 0]


def test_store_tokens_equal_images_tokenized_one_by_one(store, labelled, small_tokenizer):
    out, _, _ = store
    tok = PatchKMeansTokenizer.load(small_tokenizer)
    s = open_store(out)
    keys = s.keys()
    tokens = s.gather(np.arange(len(keys)))
    palette = default_palette(labelled.resolve().name)
    assert json.loads((out / "palettes" / f"{labelled.resolve().name}.json").read_text()) == palette.tolist()
    failed = set(json.loads((out / "store.json").read_text())["failed_images"])
    for g, (k, codes) in enumerate(zip(keys, tokens, strict=True)):
        if g in failed:
            assert not codes.any()
            continue
        how, path = k.split(":", 1)
        if how == "inpainting":
            rid, path = path.split(":", 1)
            frame = derive_input("inpainting", load_image(path), 0, rid.replace("%3A", ":").replace("%25", "%"))
        elif how == "colorization":
            frame = colorization_input(load_image(path))
        elif how == "segmentation":
            frame = label_frame(path.split(":", 1)[1], how, palette)
        elif how in ("depth", "normals"):
            frame = label_frame(path, how, None)
        else:
            frame = load_image(path)
        alone = tok.encode(to_pixels(frame[None])).numpy().astype(np.uint16)[0]
        assert np.array_equal(alone, codes), k


def test_two_ranks_give_the_bytes_of_one_and_resume_skips_finished_units(store, labelled, small_tokenizer, tmp_path,
                                                                          monkeypatch):
    ref, _, _ = store
    out = tmp_path / "ranked"
    kw = dict(part_bytes=900)  # several units
    one = tmp_path / "one"
    counter = CountingEncode(monkeypatch)
    build_store(store_config(labelled, one, small_tokenizer, **kw))
    index = json.loads((one / "store.json").read_text())
    assert len(index["units"]) > 3
    # records of several units share images (an input in segmentation, colorization, inpainting): each encoded once
    assert index["images"] == json.loads((ref / "store.json").read_text())["images"]
    assert counter.images == index["images"] - len(index["failed_images"])
    for rank in (1, 0):
        build_store(store_config(labelled, out, small_tokenizer, rank=rank, world_size=2, **kw))
    build_store(store_config(labelled, out, small_tokenizer, index_only=True, world_size=1, **kw))
    assert tree_bytes(out) == tree_bytes(one)
    counter.images = 0
    build_store(store_config(labelled, out, small_tokenizer, **kw))  # everything is finished: nothing is encoded
    assert counter.images == 0 and tree_bytes(out) == tree_bytes(one)
    # the same records however the manifest is cut into units
    a, b = open_store(ref), open_store(one)
    assert a.ids == b.ids
    assert np.array_equal(a.gather(a.first), b.gather(b.first))


def test_make_shards_store_cli(labelled, small_tokenizer, tmp_path):
    lines = (labelled / "store.jsonl").read_text().splitlines()
    manifest = labelled / "few.jsonl"  # the broken annotation and a decode worker, little else
    manifest.write_text("\n".join([ln for ln in lines if "img07" in ln][:3] + lines[-2:]) + "\n")
    args = [sys.executable, str(REPO / "data_prep" / "make_shards.py"), "--input", str(manifest), "--out", str(tmp_path / "s"),
            "--store", "--tokenizer", f"patch-kmeans:{small_tokenizer}", "--no-progress"]
    r = subprocess.run([*args, "--workers", "1", "--hole-ratio", "0.5"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "records" in r.stdout and "skipped 1" in r.stdout
    r = subprocess.run([*args, "--workers", "0", "--hole-ratio", "0.2"], capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("error:") and "hole_ratio" in r.stderr


def test_a_unit_cut_short_is_redone_to_the_same_bytes(labelled, small_tokenizer, tmp_path, monkeypatch):
    kw = dict(part_bytes=900)
    out = tmp_path / "s"
    build_store(store_config(labelled, out, small_tokenizer, **kw))
    ref = tree_bytes(out)
    index = json.loads((out / "store.json").read_text())
    units = [u for u, n in zip(index["units"], index["unit_images"], strict=True) if n > 0]
    victim = units[len(units) // 2]
    # what a kill leaves mid-unit: its images written, its records and mark not, a temp file; no index yet
    (out / ".parts" / f"{victim}.json").unlink()
    (out / "records" / f"{victim}.arrow").unlink()
    (out / "records" / f".{victim}.arrow.tmp.4242").write_bytes(b"partial")
    (out / "store.json").unlink()
    counter = CountingEncode(monkeypatch)
    build_store(store_config(labelled, out, small_tokenizer, **kw))
    assert 0 < counter.images < json.loads((out / "store.json").read_text())["images"]  # only that unit again
    assert tree_bytes(out) == ref
