"""LVM's evaluation files through evaluate.py --prompts and generate.py --prompts, on the tiny trained run."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lvm.eval.prompts import BadLine, PromptLine, read_prompts
from lvm.model.vocab import BOS_ID, EOS_ID, frame
from tests.conftest import scene
from tests.eval.conftest import cli


def test_frame_is_bos_codes_eos_and_any_span_of_it():
    codes = np.arange(10, 15)
    full = np.array([BOS_ID, 10, 11, 12, 13, 14, EOS_ID])
    assert np.array_equal(frame(codes), full)
    assert np.array_equal(frame(codes, end=6), full[:6])  # a prompt: [BOS] codes, the sentence goes on
    assert np.array_equal(frame(np.zeros(0, np.int64)), [BOS_ID, EOS_ID])
    reads = []

    def read(lo, hi):
        reads.append((lo, hi))
        return codes[lo:hi]

    for begin in range(8):
        for end in range(begin, 9):
            out = np.full(9, -1)
            frame(read, begin, end, n=5, out=out[: max(0, min(end, 7) - begin)])
            assert np.array_equal(out[: max(0, min(end, 7) - begin)], full[begin:end])
    assert all(0 <= lo < hi <= 5 for lo, hi in reads)  # only the codes inside the span are read


def test_lines_are_parsed_and_bad_ones_named_by_number(tmp_path):
    f = tmp_path / "sub" / "p.jsonl"
    f.parent.mkdir()
    rows = ['{"input": ["a.png", "/abs/b.png"], "target": ["c.png"]}', "", "{not json", '["a.png"]',
            '{"input": ["a.png"]}', '{"input": "a.png", "target": ["c.png"]}', '{"input": [], "target": []}',
            '{"input": [], "target": ["c.png"]}']
    f.write_text("\n".join(rows) + "\n")
    lines = read_prompts(f, "evaluate")
    assert [x.number for x in lines] == [1, 3, 4, 5, 6, 7, 8]  # the blank line 2 is no line
    good = [x for x in lines if isinstance(x, PromptLine)]
    assert [x.number for x in good] == [1, 8]
    assert good[0].inputs == [f.parent / "a.png", Path("/abs/b.png")]
    assert good[0].targets == [f.parent / "c.png"] and good[1].inputs == []
    why = {x.number: x.reason for x in lines if isinstance(x, BadLine)}
    assert "not JSON" in why[3] and "object" in why[4] and "'target'" in why[5]
    assert '"input"' in why[6] and '"target" lists no image' in why[7]
    assert read_prompts(f, "evaluate", base=tmp_path)[0].inputs[0] == tmp_path / "a.png"
    g = tmp_path / "g.jsonl"
    g.write_text('{"input": ["a.png"], "output": "o/x.png"}\n{"input": ["a.png"], "output": "o/x.txt"}\n'
                 '{"input": ["a.png"], "target": ["b.png"]}\n')
    lines = read_prompts(g, "generate", out=tmp_path / "gen")
    assert lines[0].output == tmp_path / "gen" / "o" / "x.png"
    assert "not an image file name" in lines[1].reason and "'output'" in lines[2].reason


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("prompt_images")
    (d / "imgs").mkdir()
    for i in range(4):
        scene(30 + i).save(d / "imgs" / f"a{i}.png")
    (d / "imgs" / "broken.png").write_bytes(b"not a png")
    return d


def test_target_perplexity_equals_the_sentence_scored_by_perplexity(trained, images, tmp_path):
    """Each scored line's target perplexity is what lvm.eval.perplexity gives the same images as a sentence;
    inputs that do not fit the window next to the targets are cut from the left by whole images; bad lines are
    reported by number, skipped, and keep their place in the results."""
    from lvm.data.shards.format import write_shard
    from lvm.data.shards.shard_set import open_shards
    from lvm.eval.model_io import load_model
    from lvm.eval.perplexity import results, score
    from lvm.eval.prompts import ImageCodes, tokenizer_for

    run, hf = trained
    a = [f"imgs/a{i}.png" for i in range(4)]
    lines = [{"input": a[:2], "target": [a[2]]}, {"input": [], "target": [a[3], a[0]]}, "{bad json",
             {"input": [a[0]]}, {"input": ["imgs/missing.png"], "target": [a[1]]},
             {"input": [a[0]], "target": ["imgs/broken.png"]}, {"input": (a * 3)[:9], "target": [a[1]]}]
    f = images / "eval.jsonl"  # relative paths start from the file's folder
    f.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    r = cli("evaluate.py", "--checkpoint", run, "--prompts", f, "--out", tmp_path / "e", "--batch-size", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert [x.split(" line ")[1].split(":")[0] for x in errors] == ["3", "4", "5", "6"], errors
    assert "missing.png" in errors[2] and "broken.png" in errors[3]
    res = [json.loads(x) for x in (tmp_path / "e" / "prompt_scores.jsonl").read_text().splitlines()]
    assert [x["line"] for x in res] == list(range(1, 8)) and ["error" in x for x in res] == [False, False] + [True] * 4 + [False]
    one, two, long = res[0], res[1], res[6]
    assert long["inputs_used"] == 7 and long["inputs_dropped"] == 2  # (2048 - 256) // 256 inputs fit
    assert one["tokens"] == 256 and two["tokens"] == 512 and len(two["target_perplexities"]) == 2
    total = json.loads((tmp_path / "e" / "prompt_eval.json").read_text())
    assert total["scored"] == 3 and total["skipped_lines"] == [3, 4, 5, 6]
    assert total["perplexity"] == pytest.approx((one["perplexity"] + two["perplexity"] + long["perplexity"]) / 3)

    # the same images as sentences of a shard, scored by the existing perplexity code
    tok, resize = tokenizer_for(run, None)
    codes = ImageCodes(tok, resize)
    (c,) = [x[0] for x in codes.lines([PromptLine(0, [images / p for p in a], [], None)])]
    codes.close()
    sentences = [[0, 1, 2], [3, 0], [2, 3, 0, 1, 2, 3, 0, 1]]  # the long line's last 7 inputs and its target
    model, _ = load_model(hf, torch.device("cpu"))
    by_frame = []  # each sentence alone: its perplexity per number of context frames
    for k, s in enumerate(sentences):
        write_shard(tmp_path / f"s{k}" / "p.arrow", [{"tokens": c[s].reshape(-1).numpy().astype(np.uint16),
                                                      "n_images": len(s), "kind": "sequence", "id": str(k)}])
        table = open_shards(tmp_path / f"s{k}")
        by_frame.append(results(score(model, table, model.config.max_position_embeddings, progress=False))
                        ["perplexity_by_context_frames"])
    assert one["perplexity"] == pytest.approx(by_frame[0]["2"], rel=1e-4)
    assert long["perplexity"] == pytest.approx(by_frame[2]["7"], rel=1e-4)
    # the second line: its two targets are frames 0 and 1 of their sentence
    assert two["target_perplexities"][0] == pytest.approx(by_frame[1]["0"], rel=1e-4)
    assert two["target_perplexities"][1] == pytest.approx(by_frame[1]["1"], rel=1e-4)
    assert two["perplexity"] == pytest.approx(math.sqrt(by_frame[1]["0"] * by_frame[1]["1"]), rel=1e-4)

    bad = images / "bad.jsonl"
    bad.write_text('{"input": []}\n{"input": ["imgs/missing.png"], "target": ["imgs/a0.png"]}\n')
    r = cli("evaluate.py", "--checkpoint", hf, "--prompts", bad, "--out", tmp_path / "b")
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 3 and "no line" in errors[-1], r.stderr[-3000:]


def test_generate_writes_candidates_per_line(trained, images, tmp_path):
    """N candidates per line, LVM's grid at `output` (a row per candidate, new images side by side) and each row
    alone; relative inputs from --base, outputs from --out; bad lines reported and skipped."""
    _, hf = trained
    (tmp_path / "g").mkdir()
    f = tmp_path / "g" / "gen.jsonl"
    rows = [{"input": ["imgs/a0.png", "imgs/a1.png"], "output": "o/one.png"},
            {"input": ["imgs/a2.png", "imgs/a3.png"], "output": "o/two.jpg"},
            {"input": [str(images / "imgs" / "a0.png")], "output": "o/three.png"},
            {"input": ["imgs/a0.png"], "output": "o/x.txt"},
            {"input": ["imgs/nope.png"], "output": "o/five.png"}]
    f.write_text("\n".join(json.dumps(x) for x in rows) + "\n")
    r = cli("generate.py", "--checkpoint", hf, "--prompts", f, "--base", images, "--out", tmp_path / "out",
            "--candidates", "2", "--n-images", "2", "--batch-size", "2", "--seed", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 2 and " line 4: " in errors[0] and " line 5: " in errors[1] and "nope.png" in errors[1]
    res = [json.loads(x) for x in (tmp_path / "out" / "generated.jsonl").read_text().splitlines()]
    assert [x["line"] for x in res] == [1, 2, 3, 4, 5] and ["error" in x for x in res] == [False] * 3 + [True] * 2
    for x in res[:3]:
        assert len(x["candidates"]) == 2
        grid = np.asarray(Image.open(x["output"]))
        assert grid.shape == (2 * 256, 2 * 256, 3)  # 2 candidates x 2 new images
        for c, p in enumerate(x["candidates"]):
            row = np.asarray(Image.open(p))
            assert row.shape == (256, 2 * 256, 3)
            if p.endswith(".png"):
                assert np.array_equal(row, grid[c * 256 : (c + 1) * 256])
    assert res[0]["output"] == str(tmp_path / "out" / "o" / "one.png") and res[2]["inputs_used"] == 1
    assert not np.array_equal(*(np.asarray(Image.open(p)) for p in res[0]["candidates"]))
