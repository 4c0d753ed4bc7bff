import numpy as np
import pytest
from PIL import Image

from lvm.tokenizer.preprocess import SourceError, load_image, prepare_image


def test_every_valid_mode_becomes_256_rgb(mixed_corpus):
    for name, path in mixed_corpus["modes"].items():
        arr = load_image(path)
        assert arr.shape == (256, 256, 3) and arr.dtype == np.uint8, name


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    arr = np.full((8, 8), 65535, np.uint16)
    arr[:, :4] = 32768
    Image.fromarray(arr).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png", resize="center-crop")
    assert out[:, -1].min() == 255          # full scale stays white
    assert 120 <= out[128, 0, 0] <= 135     # half scale is mid-grey, not clipped to 255


def test_alpha_is_composited_on_white(tmp_path):
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert load_image(tmp_path / "clear.png").min() == 255


def test_resize_modes_differ_on_non_square():
    img = Image.new("RGB", (512, 256), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 128, 256))  # white left quarter
    squash, crop = prepare_image(img, resize="squash"), prepare_image(img, resize="center-crop")
    assert squash[:, 0].min() == 255 and crop[:, 0].max() == 0  # the crop cut the white strip away
    with pytest.raises(ValueError):
        prepare_image(img, resize="stretch")


@pytest.mark.parametrize("name,reason", [
    ("truncated.png", "truncated"), ("truncated.jpg", "truncated"), ("empty.png", "empty"),
    ("text.png", "not an image"), ("bomb.png", "decompression bomb"), ("nope.png", "not found"),
])
def test_broken_images_raise_with_reason(mixed_corpus, name, reason):
    path = mixed_corpus["broken"].get(name, mixed_corpus["manifest"].parent / "broken" / name)
    with pytest.raises(SourceError, match=reason):
        load_image(path)
