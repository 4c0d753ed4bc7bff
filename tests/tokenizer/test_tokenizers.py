import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lvm.tokenizer import load_tokenizer
from lvm.tokenizer.patch_kmeans import PatchKMeansTokenizer
from lvm.tokenizer.preprocess import prepare_image, to_pixels
from lvm.tokenizer.vqgan import VQGAN, VQGANConfig

# Key names of open-muse's VQGANModel checkpoint (vqgan-f16-8192-laion, LVM's tokenizer).
REFERENCE_KEYS = [
    "encoder.conv_in.weight", "encoder.down.0.block.0.norm1.weight", "encoder.down.0.downsample.conv.weight",
    "encoder.mid.block_1.conv1.weight", "quant_conv.weight", "quantize.embedding.weight",
    "post_quant_conv.weight", "decoder.up.4.block.2.conv2.weight", "decoder.up.1.upsample.conv.weight",
    "decoder.conv_out.weight", "encoder.down.1.block.0.nin_shortcut.weight",
]


def test_paper_vqgan_has_reference_layout_and_size():
    with torch.device("meta"):
        model = VQGAN(VQGANConfig())
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert round(n(model) / 1e6, 1) == 146.2
    assert round(n(model.encoder) / 1e6, 1) == 58.7 and round(n(model.decoder) / 1e6, 1) == 87.0
    keys = set(model.state_dict())
    assert set(REFERENCE_KEYS) <= keys
    assert not any("attn" in k for k in keys)


SMALL = {"hidden_channels": 32, "channel_mult": [1, 1, 2, 2, 2], "num_res_blocks": 1, "z_channels": 16,
         "quantized_embed_dim": 8, "num_embeddings": 8192, "resolution": 256, "attn_resolutions": [],
         "no_attn_mid_block": True, "_class_name": "VQGANModel"}


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_vqgan_loads_checkpoint_and_round_trips_shapes(tmp_path, fmt):
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig.from_dict(SMALL))
    (tmp_path / "config.json").write_text(json.dumps(SMALL))
    if fmt == "safetensors":
        save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    else:
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    tok = load_tokenizer(f"vqgan:{tmp_path}", device="cpu")
    pixels = torch.rand(2, 3, 256, 256)
    codes = tok.encode(pixels)
    assert codes.shape == (2, 256) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < 8192
    images = tok.decode(codes)
    assert images.shape == (2, 3, 256, 256) and 0 <= images.min() and images.max() <= 1
    assert torch.equal(codes, model.encode_codes(pixels))


def test_vqgan_strict_loading_names_bad_keys(tmp_path):
    model = VQGAN(VQGANConfig.from_dict(SMALL))
    state = model.state_dict()
    state.pop("decoder.conv_out.weight")
    state["encoder.extra.weight"] = torch.zeros(1)
    (tmp_path / "config.json").write_text(json.dumps(SMALL))
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"decoder\.conv_out\.weight.*encoder\.extra\.weight"):
        load_tokenizer(f"vqgan:{tmp_path}")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(f"vqgan:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        load_tokenizer("dalle:whatever")


def photos():
    skdata = pytest.importorskip("skimage.data")
    from PIL import Image

    names = ["astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "page", "text", "clock",
             "hubble_deep_field", "immunohistochemistry", "retina", "brick", "grass", "gravel", "colorwheel", "cat"]
    return np.stack([prepare_image(Image.fromarray(getattr(skdata, n)())) for n in names])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()
    return 10 * np.log10(255**2 / mse)


def test_patch_kmeans_is_deterministic_and_reconstructs_photos(tmp_path):
    imgs = photos()
    a = PatchKMeansTokenizer.fit(imgs, seed=3, iters=4)
    b = PatchKMeansTokenizer.fit(imgs, seed=3, iters=4)
    assert torch.equal(a.centroids, b.centroids)
    codes = a.encode(to_pixels(imgs))
    assert codes.shape == (len(imgs), 256) and codes.max() < 8192
    rec = (a.decode(codes).movedim(1, -1).numpy() * 255).round().astype(np.uint8)
    assert psnr(imgs, rec) >= 20.0
    a.save(tmp_path)
    loaded = load_tokenizer(f"patch-kmeans:{tmp_path}")
    assert torch.equal(loaded.encode(to_pixels(imgs)), codes)
    with pytest.raises(ValueError):
        a.decode(torch.tensor([[8192] * 256]))


def test_patch_kmeans_fits_on_fewer_patches_than_codes():
    frames = photos()[:3]  # 768 patches for 8192 codes
    tok = PatchKMeansTokenizer.fit(frames, iters=2)
    codes = tok.encode(to_pixels(frames))
    assert codes.max() < 8192 and tok.decode(codes).shape == (3, 3, 256, 256)
