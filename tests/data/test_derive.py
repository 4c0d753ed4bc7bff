import json

import numpy as np
import pytest
from PIL import Image

from lvm.data.derive import (
    COLOUR_MAP,
    colorization_input,
    default_palette,
    depth_image,
    derive_input,
    inpainting_input,
    label_frame,
    normals_image,
    palette_for,
    record_rng,
)
from lvm.tokenizer.preprocess import SourceError
from tests.conftest import scene


def frame(seed=0):
    return np.asarray(scene(seed), dtype=np.uint8).copy()


def test_colorization_is_itu_601_grey_in_three_channels():
    f = frame()
    g = colorization_input(f)
    assert g.shape == f.shape and g.dtype == np.uint8
    assert np.array_equal(g[..., 0], g[..., 1]) and np.array_equal(g[..., 0], g[..., 2])
    want = np.rint(0.2989 * f[..., 0] + 0.5870 * f[..., 1] + 0.1140 * f[..., 2])
    assert np.abs(g[..., 0].astype(int) - want).max() == 0


def test_inpainting_is_deterministic_per_seed_and_record():
    f = frame()
    a = derive_input("inpainting", f, 0, "r1")
    assert np.array_equal(a, derive_input("inpainting", f, 0, "r1"))
    assert not np.array_equal(a, derive_input("inpainting", f, 1, "r1")) or not np.array_equal(
        derive_input("inpainting", f, 0, "r2"), a)
    with pytest.raises(ValueError, match="derive"):
        derive_input("blur", f, 0, "r1")


def test_inpainting_square_hole_and_patch_styles():
    f = np.full((256, 256, 3), 200, np.uint8)
    for k in range(20):
        hole = inpainting_input(f, record_rng(k, "x"), hole_ratio=1.0)
        zero = (hole == 0).all(-1)
        ys, xs = np.nonzero(zero)
        side = ys.max() - ys.min() + 1
        assert zero.sum() == side * side and xs.max() - xs.min() + 1 == side  # one square
        assert 25 <= side < 128  # 10-50% of the short side
        patches = inpainting_input(f, record_rng(k, "x"), hole_ratio=0.0)
        blocks = (patches == 0).all(-1).reshape(8, 32, 8, 32).transpose(0, 2, 1, 3).reshape(64, -1)
        assert np.all(blocks.all(1) | ~blocks.any(1))  # whole 32-px patches, nothing else
    ratios = [(inpainting_input(f, record_rng(0, str(k)), hole_ratio=0.0) == 0).all(-1).mean() for k in range(50)]
    assert 0.3 < np.mean(ratios) < 0.7 and max(ratios) - min(ratios) > 0.5  # a random ratio per image


def test_palette_is_fixed_per_dataset_and_can_be_given(tmp_path):
    a = default_palette("ade20k")
    assert a.shape == (256, 3) and a.dtype == np.uint8 and (a[0] == 0).all()
    assert np.array_equal(a, default_palette("ade20k")) and not np.array_equal(a, default_palette("coco"))
    (tmp_path / "mine.json").write_text(json.dumps([[1, 2, 3], [4, 5, 6]]))
    p = palette_for("mine", tmp_path)
    assert p[1].tolist() == [4, 5, 6] and p[2].tolist() == [0, 0, 0]
    (tmp_path / "bad.json").write_text(json.dumps([[1, 2]]))
    with pytest.raises(ValueError, match="bad.json"):
        palette_for("bad", tmp_path)


def test_segmentation_map_colours_every_class_by_palette_without_blending(tmp_path):
    classes = np.zeros((100, 150), np.uint8)
    classes[:, 50:] = 3
    classes[60:, :] = 7
    Image.fromarray(classes, "L").save(tmp_path / "seg.png")
    pal = default_palette("d")
    out = label_frame(str(tmp_path / "seg.png"), "segmentation", pal)
    assert out.shape == (256, 256, 3)
    colours = {tuple(c) for c in out.reshape(-1, 3)}
    assert colours == {tuple(pal[0]), tuple(pal[3]), tuple(pal[7])}  # nearest neighbour: no colour of no class
    classes[0, 0] = 255
    Image.fromarray(classes.astype(np.uint16) * 2).save(tmp_path / "big.png")
    with pytest.raises(SourceError, match="outside"):
        label_frame(str(tmp_path / "big.png"), "segmentation", pal)


def test_depth_and_normals_become_colour_images(tmp_path):
    depth = np.tile(np.arange(1, 101, dtype=np.uint16) * 300, (20, 1))
    depth[:, :5] = 0
    Image.fromarray(depth).save(tmp_path / "d.png")
    np.save(tmp_path / "d.npy", depth.astype(np.float32))
    img = np.asarray(depth_image(depth))
    assert (img[:, :5] == 0).all()
    assert tuple(img[0, 5]) == tuple(COLOUR_MAP[0]) and tuple(img[0, -1]) == tuple(COLOUR_MAP[-1])
    a = label_frame(str(tmp_path / "d.png"), "depth", None)
    b = label_frame(str(tmp_path / "d.npy"), "depth", None)
    assert np.array_equal(a, b)  # the same depths, as 16-bit PNG or NumPy, draw the same image
    n = np.zeros((10, 10, 3))
    n[..., 2] = 1.0
    assert np.asarray(normals_image(n))[0, 0].tolist() == [128, 128, 255]
    with pytest.raises(SourceError, match="file not found"):
        label_frame(str(tmp_path / "missing.npy"), "normals", None)
