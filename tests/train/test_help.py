import re

from lvm.train.options import build_parser


def test_help_shows_each_default_once():
    text = build_parser().format_help()
    blocks = re.split(r"\n  (?=--)", text.split("options:", 1)[1])[1:]
    assert len(blocks) > 30
    for block in blocks:
        flat = " ".join(block.split())
        assert len(re.findall(r"\bdefault\b", flat)) == 1, flat
