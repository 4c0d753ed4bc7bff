import re

from lvm.train.options import build_parser


def test_help_shows_each_default_once():
    text = build_parser().format_help()
    blocks = re.split(r"\n  (?=--)", text.split("options:", 1)[1])[1:]
    assert len(blocks) > 30
    for block in blocks:
        flat = " ".join(block.split())
        assert len(re.findall(r"\bdefault\b", flat)) == 1, flat


def test_help_says_which_wins_flags_or_config():
    flat = " ".join(build_parser().format_help().split())
    assert "--config FILE" in flat and "--print-config" in flat
    assert "Flags win over the file wherever they stand on the command line" in flat
