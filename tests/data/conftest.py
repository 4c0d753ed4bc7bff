"""Fixtures of the store and compose tests: a labelled folder, its manifest and its token store (built once)."""

from __future__ import annotations

import pytest

from lvm.data.labelled import manifest_from_labelled_tree
from lvm.data.offline.config import BuildConfig
from lvm.data.offline.sources.manifest import write_manifest
from lvm.data.store_build import build_store
from lvm.tokenizer.patch_kmeans import PatchKMeansTokenizer
from tests.data.labelled_tree import make_labelled_tree


class CountingEncode:
    """Counts the images the tokenizer encodes (patched onto the class: every instance counts)."""

    def __init__(self, monkeypatch):
        self.images, self.calls = 0, 0
        real = PatchKMeansTokenizer.encode

        def encode(tok, pixels):
            self.calls += 1
            self.images += int(pixels.shape[0])
            return real(tok, pixels)

        monkeypatch.setattr(PatchKMeansTokenizer, "encode", encode)


@pytest.fixture(scope="session")
def labelled(tmp_path_factory):
    root = make_labelled_tree(tmp_path_factory.mktemp("labelled"))
    entries = manifest_from_labelled_tree(root, ("colorization", "inpainting"))
    write_manifest(entries, root / "store.jsonl")
    return root


def store_config(root, out, tok, **kw):
    return BuildConfig(inputs=[str(root / "store.jsonl")], out=str(out), tokenizer=f"patch-kmeans:{tok}", workers=0,
                       batch_size=16, progress=False, **kw)


@pytest.fixture(scope="session")
def store(labelled, small_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("store")
    mp = pytest.MonkeyPatch()
    counter = CountingEncode(mp)
    try:
        summary = build_store(store_config(labelled, out, small_tokenizer))
    finally:
        mp.undo()
    return out, summary, counter


