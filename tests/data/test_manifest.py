import json

from lvm.data.offline.sources import Skip
from lvm.data.offline.sources.manifest import manifest_from_tree, read_manifest, unit_sentences
from lvm.data.offline.units import plan_units
from lvm.data.synth import CorpusSize, make_corpus


def test_malformed_lines_are_skipped_with_line_and_reason(mixed_corpus):
    m = read_manifest(mixed_corpus["manifest"])
    assert len(m.skipped) == mixed_corpus["n_malformed_lines"]
    n_lines = len(mixed_corpus["manifest"].read_text().splitlines())
    # the corpus ends with: a line that is not JSON, a line without 'kind', pairs with an odd image count
    reasons = [s.reason for s in sorted(m.skipped, key=lambda s: s.line)]
    assert [s.line for s in sorted(m.skipped, key=lambda s: s.line)] == [n_lines - 2, n_lines - 1, n_lines]
    assert all(r.startswith("malformed manifest line:") for r in reasons)
    assert "Unterminated string" in reasons[0]
    assert "'kind' must be one of" in reasons[1]
    assert "even number of images" in reasons[2]


def test_long_sentences_are_chunked_to_16(mixed_corpus):
    m = read_manifest(mixed_corpus["manifest"])
    chunks = [s for s in m.sentences if s.id.startswith("long#")]
    assert [len(s.images) for s in chunks] == [16, 4]
    assert [s.id for s in chunks] == ["long#0", "long#1"]


def test_video_longer_than_max_images_becomes_chunks(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "v", "kind": "video", "video": "a.mp4", "max_frames": 40}) + "\n")
    m = read_manifest(tmp_path / "m.jsonl")
    assert [(s.frame_offset, s.max_frames) for s in m.sentences] == [(0, 16), (16, 16), (32, 8)]


def test_duplicate_ids_are_skipped(tmp_path):
    line = json.dumps({"id": "x", "kind": "image", "images": ["a.png"]})
    (tmp_path / "m.jsonl").write_text(line + "\n" + line + "\n")
    m = read_manifest(tmp_path / "m.jsonl")
    assert len(m.sentences) == 1 and "duplicate" in m.skipped[0].reason


def test_unit_source_yields_chunks_with_their_lines_fields_or_a_skip(tmp_path):
    line = {"id": "p", "kind": "pairs", "images": [f"{i}.png" for i in range(20)], "task": "seg", "dataset": "ade"}
    (tmp_path / "m.jsonl").write_text(json.dumps(line) + "\n")
    [chunks] = list(unit_sentences(plan_units([str(tmp_path / "m.jsonl")])[0], max_images=16))
    assert [c.id for c in chunks] == ["p#0", "p#1"]
    assert all(c.fields["task"] == "seg" and c.fields["dataset"] == "ade" for c in chunks)
    gone = plan_units([str(tmp_path / "{m,missing}.jsonl")])[1]
    assert [(s.source, s.reason) for s in unit_sentences(gone) if isinstance(s, Skip)] == [(gone.path, "file not found")]


def test_tree_manifest_covers_every_kind(tmp_path):
    make_corpus(tmp_path, seed=1, size=CorpusSize(videos=1, gifs=1, sequences=1, frames=3, pairs_per_task=3, images=2))
    entries = manifest_from_tree(tmp_path, pairs_per_sentence=2)
    kinds = sorted({e["kind"] for e in entries})
    assert kinds == ["image", "pairs", "sequence", "video"]
    pairs = [e for e in entries if e["kind"] == "pairs"]
    assert len(pairs) == 3 * 2 and all(len(e["images"]) in (2, 4) for e in pairs)
    assert pairs[0]["images"][:2] == ["pairs/edges/input/000.png", "pairs/edges/label/000.png"]
