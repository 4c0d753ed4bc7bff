import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lvm.data.compose import ComposeConfig, compose
from lvm.data.shards.format import read_shard
from lvm.data.shards.shard_set import open_shards, read_tokenizer_info
from lvm.data.store import open_store
from tests.data.conftest import CountingEncode

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "data_prep" / "compose.py"
T = 256


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def sentences(out: Path, split: str = "train") -> list[dict]:
    rows = []
    index = json.loads((out / "index.json").read_text())
    for s in index["shards"]:
        if s["path"].startswith(split + "/"):
            rows += read_shard(out / s["path"]).to_pylist()
    return rows


def images_of(row) -> list[bytes]:
    toks = np.asarray(row["tokens"], np.uint16)
    assert len(toks) == row["n_images"] * T
    return [toks[k : k + T].tobytes() for k in range(0, len(toks), T)]


def store_pairs(store_dir: Path, task: str) -> tuple[set, dict]:
    """(input, label) token pairs of a task, and each pair's record id."""
    s = open_store(store_dir)
    tok = s.gather(np.arange(s.image_first[-1]))
    pairs = {}
    for i, (k, g) in enumerate(zip(s.kinds, s.groups, strict=True)):
        if k == "pair" and g == task:
            pairs[(tok[s.first[i]].tobytes(), tok[s.second[i]].tobytes())] = s.ids[i]
    return set(pairs), pairs


def cfg(store_dir, out, **kw):
    base = dict(store=str(store_dir), out=str(out), mode="pairs", names=["segmentation"], shots=3, epochs=2,
                val_fraction=0.45, sentences_per_shard=2, progress=False)
    base.update(kw)
    return ComposeConfig(**base)


@pytest.fixture(scope="module")
def composed(store, tmp_path_factory):
    store_dir = store[0]
    out = tmp_path_factory.mktemp("composed")
    mp = pytest.MonkeyPatch()
    counter = CountingEncode(mp)
    try:
        summary = compose(cfg(store_dir, out))
    finally:
        mp.undo()
    return out, summary, counter


def test_pairs_stay_adjacent_each_epoch_once_val_held_out_whole(composed, store):
    out, summary, counter = composed
    assert counter.calls == 0  # composing never encodes
    pairs, _ = store_pairs(store[0], "segmentation")
    train, val = sentences(out, "train"), sentences(out, "val")
    assert train and val
    seen = {split: [] for split in ("train", "val")}
    for split, rows in (("train", train), ("val", val)):
        for r in rows:
            assert r["kind"] == "pairs" and r["n_images"] % 2 == 0 and r["n_images"] <= 6
            imgs = images_of(r)
            for k in range(0, len(imgs), 2):
                assert (imgs[k], imgs[k + 1]) in pairs  # input then its label, adjacent
                seen[split].append((imgs[k], imgs[k + 1]))
    assert not set(seen["train"]) & set(seen["val"])  # a pair is held out whole
    assert set(seen["train"]) | set(seen["val"]) == pairs
    n_train = summary["items"]["train"]
    by_epoch = [[] for _ in range(2)]
    for r in train:
        by_epoch[int(r["id"].split("/e")[1].split("/")[0])].append(r)
    groupings = []
    for rows in by_epoch:
        got = [p for r in rows for p in zip(images_of(r)[::2], images_of(r)[1::2], strict=True)]
        assert len(got) == n_train and len(set(got)) == n_train  # every training pair once per epoch
        groupings.append([tuple(zip(images_of(r)[::2], images_of(r)[1::2], strict=True)) for r in rows])
    assert groupings[0] != groupings[1]  # each epoch a new grouping


def test_composed_shards_are_ordinary_training_data(composed, store):
    out, _, _ = composed
    train = open_shards(out / "train")
    assert len(train) == sum(len(sentences(out, "train")) for _ in [0]) and train.max_token.max() < 8192
    assert read_tokenizer_info(out / "train")["details"] == json.loads((store[0] / "tokenizer.json").read_text())["details"]
    assert (out / "palettes").is_dir() and json.loads((out / "compose.json").read_text())["mode"] == "pairs"


def test_same_seed_same_bytes_other_seed_other_grouping(composed, store, tmp_path):
    out, _, _ = composed
    again = tmp_path / "again"
    compose(cfg(store[0], again))
    assert tree_bytes(again) == tree_bytes(out)
    other = tmp_path / "other"
    compose(cfg(store[0], other, seed=1))
    assert [r["tokens"] for r in sentences(other)] != [r["tokens"] for r in sentences(out)]


def test_two_ranks_give_the_bytes_of_one(composed, store, tmp_path):
    out, _, _ = composed
    ranked = tmp_path / "ranked"
    for rank in (1, 0):
        s = compose(cfg(store[0], ranked, rank=rank, world_size=2))
        assert s["report"] is None or rank == 0
    compose(cfg(store[0], ranked, index_only=True))
    assert tree_bytes(ranked) == tree_bytes(out)


def test_categories_make_shots_of_one_category(store, tmp_path):
    s = compose(cfg(store[0], tmp_path / "c", mode="categories", names=[], images_per_shot=2, shots=2, val_fraction=0.0))
    st = open_store(store[0])
    tok = st.gather(np.arange(st.image_first[-1]))
    category = {tok[st.first[i]].tobytes(): st.groups[i] for i in range(len(st.ids)) if st.kinds[i] == "image"}
    rows = sentences(tmp_path / "c")
    assert rows and s["counts"]["train"] == len(rows) // 2
    for r in rows:
        imgs = images_of(r)
        assert r["kind"] == "sequence" and len(imgs) <= 4
        for k in range(0, len(imgs), 2):
            assert category[imgs[k]] == category[imgs[k + 1]] and imgs[k] != imgs[k + 1]
    per_epoch = Counter(category[i] for r in rows if "/e0/" in r["id"] for i in images_of(r))
    assert per_epoch == {"cat": 4, "dog": 4}  # 4 cats, 5 dogs: shots of 2, the odd dog waits


def test_multi_groups_an_input_with_its_labels(store, tmp_path):
    compose(cfg(store[0], tmp_path / "m", mode="multi", names=["segmentation", "depth"], shots=2, val_fraction=0.0))
    seg, _ = store_pairs(store[0], "segmentation")
    depth, _ = store_pairs(store[0], "depth")
    rows = sentences(tmp_path / "m")
    orders = set()
    for r in rows:
        imgs = images_of(r)
        assert len(imgs) % 3 == 0 and len(imgs) <= 6
        for k in range(0, len(imgs), 3):
            x, a, b = imgs[k : k + 3]
            assert {(x, a), (x, b)} & seg and {(x, a), (x, b)} & depth
            orders.add((x, a) in seg)
    assert rows and orders <= {True, False}


def test_limits_and_errors_are_one_line(store, tmp_path):
    with pytest.raises(ValueError, match="more than 16"):
        compose(cfg(store[0], tmp_path / "x", shots=9))
    with pytest.raises(ValueError, match="no pairs of task 'edges'"):
        compose(cfg(store[0], tmp_path / "y", names=["edges"]))
    r = subprocess.run([sys.executable, str(COMPOSE), "--store", str(tmp_path / "nothing"), "--out", str(tmp_path / "z"),
                        "--pairs", "seg"], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "not a finished token store" in r.stderr
    r = subprocess.run([sys.executable, str(COMPOSE), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--images-per-shot" in r.stdout


def test_kill_mid_compose_resumes_to_the_same_bytes(store, tmp_path):
    args = [sys.executable, str(COMPOSE), "--store", str(store[0]), "--pairs", "segmentation", "--shots", "1",
            "--epochs", "60", "--sentences-per-shard", "1", "--val-fraction", "0.3", "--no-progress"]
    ref = tmp_path / "ref"
    subprocess.run([*args, "--out", str(ref)], check=True, capture_output=True)
    n_parts = len(list((ref / ".parts").glob("*.json")))
    out = tmp_path / "killed"
    proc = subprocess.Popen([*args, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / ".parts").glob("e*.json"))) < 5:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list((out / ".parts").glob("*.json")))
    assert 5 <= done < n_parts and not (out / "index.json").exists(), "the kill must land mid-compose"
    r = subprocess.run([*args, "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert tree_bytes(out) == tree_bytes(ref)


def test_documented_command_from_a_labelled_folder(labelled, small_tokenizer, tmp_path):
    """README's one command: labelled folder -> manifest -> store -> 3-shot sentences whose every image equals that
    image tokenized alone."""
    from lvm.data.derive import default_palette, label_frame
    from lvm.tokenizer.patch_kmeans import PatchKMeansTokenizer
    from lvm.tokenizer.preprocess import load_image, to_pixels

    py = sys.executable
    manifest, store_dir, out = tmp_path / "m.jsonl", tmp_path / "store", tmp_path / "ade-3shot"
    command = (f"{py} {REPO}/data_prep/labelled_manifest.py {labelled} --out {manifest} && "
               f"{py} {REPO}/data_prep/make_shards.py --input {manifest} --out {store_dir} --store --workers 0 "
               f"--tokenizer patch-kmeans:{small_tokenizer} --no-progress && "
               f"{py} {COMPOSE} --store {store_dir} --out {out} --pairs segmentation --shots 3 --epochs 2 --seed 0 "
               "--val-fraction 0 --no-progress")
    r = subprocess.run(["bash", "-c", command], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    tok = PatchKMeansTokenizer.load(small_tokenizer)

    def alone(frame):
        return tok.encode(to_pixels(frame[None])).numpy().astype(np.uint16)[0].tobytes()

    palette = default_palette(labelled.resolve().name)
    want = set()
    for ann in sorted((labelled / "annotations" / "training").glob("*.png")):
        try:
            label = label_frame(str(ann), "segmentation", palette)
        except Exception:
            continue  # the truncated annotation: skipped by the store too
        want.add((alone(load_image(labelled / "images" / "training" / f"{ann.stem}.jpg")), alone(label)))
    rows = sentences(out)
    got = [p for r in rows for p in zip(images_of(r)[::2], images_of(r)[1::2], strict=True)]
    assert len(rows) == 2 * 3 and len(got) == 2 * len(want) and set(got) == want
