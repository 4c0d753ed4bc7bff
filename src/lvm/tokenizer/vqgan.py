"""The paper's tokenizer: the MaskGIT/MUSE VQGAN (f=16, 8192 codes of dimension 64).

The module tree mirrors the state-dict layout of open-muse's `VQGANModel` (checkpoint
`vqgan-f16-8192-laion`, also the tokenizer released with LVM), so its `pytorch_model.bin` or
`model.safetensors` loads strictly:

    encoder.conv_in, encoder.down.{i}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut},
    encoder.down.{i}.downsample.conv, encoder.mid.block_{1,2}, encoder.norm_out, encoder.conv_out,
    quant_conv, quantize.embedding, post_quant_conv,
    decoder.conv_in, decoder.mid.block_{1,2}, decoder.up.{i}.block.{j}, decoder.up.{i}.upsample.conv,
    decoder.norm_out, decoder.conv_out

Taming-style ResNet blocks (GroupNorm(32) + SiLU + 3x3 convs), downsampling by a stride-2 conv
after asymmetric (0,1,0,1) padding, nearest-neighbour upsampling + conv, nearest-code quantization.
Inputs are pixels in [0, 1]; decoded pixels are clamped to [0, 1].
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VQGANConfig:
    resolution: int = 256
    num_channels: int = 3
    hidden_channels: int = 128
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 4, 6])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=list)
    no_attn_mid_block: bool = True
    z_channels: int = 64
    num_embeddings: int = 8192
    quantized_embed_dim: int = 64
    dropout: float = 0.0
    resample_with_conv: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> VQGANConfig:
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        cfg.channel_mult = list(cfg.channel_mult)
        cfg.attn_resolutions = list(cfg.attn_resolutions or [])
        return cfg

    @property
    def num_resolutions(self) -> int:
        return len(self.channel_mult)

    @property
    def latent_size(self) -> int:
        return self.resolution // 2 ** (self.num_resolutions - 1)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, ch, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x)


class AttnBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: ResNet blocks (+ attention), then an optional resampler."""

    def __init__(self, cin, cout, n_blocks, with_attn, resample: str | None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout) for i in range(n_blocks))
        self.attn = nn.ModuleList(AttnBlock(cout) for _ in range(n_blocks) if with_attn)
        if resample == "down":
            self.downsample = Downsample(cout)
        elif resample == "up":
            self.upsample = Upsample(cout)

    def forward(self, x):
        for i, blk in enumerate(self.block):
            x = blk(x)
            if len(self.attn):
                x = self.attn[i](x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class MidBlock(nn.Module):
    def __init__(self, ch: int, with_attn: bool):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch)
        if with_attn:
            self.attn_1 = AttnBlock(ch)
        self.block_2 = ResnetBlock(ch, ch)

    def forward(self, x):
        x = self.block_1(x)
        if hasattr(self, "attn_1"):
            x = self.attn_1(x)
        return self.block_2(x)


class Encoder(nn.Module):
    def __init__(self, c: VQGANConfig):
        super().__init__()
        ch, mult, n = c.hidden_channels, c.channel_mult, c.num_resolutions
        self.conv_in = nn.Conv2d(c.num_channels, ch, 3, padding=1)
        res, levels, cin = c.resolution, [], ch
        for i in range(n):
            cout = ch * mult[i]
            levels.append(Level(cin, cout, c.num_res_blocks, res in c.attn_resolutions, "down" if i < n - 1 else None))
            cin, res = cout, res // 2 if i < n - 1 else res
        self.down = nn.ModuleList(levels)
        self.mid = MidBlock(cin, not c.no_attn_mid_block)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, c.z_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class Decoder(nn.Module):
    def __init__(self, c: VQGANConfig):
        super().__init__()
        ch, mult, n = c.hidden_channels, c.channel_mult, c.num_resolutions
        cin = ch * mult[-1]
        self.conv_in = nn.Conv2d(c.z_channels, cin, 3, padding=1)
        self.mid = MidBlock(cin, not c.no_attn_mid_block)
        res, levels = c.latent_size, [None] * n
        for i in reversed(range(n)):  # built coarse to fine, stored fine to coarse (checkpoint order)
            cout = ch * mult[i]
            levels[i] = Level(cin, cout, c.num_res_blocks + 1, res in c.attn_resolutions, "up" if i > 0 else None)
            cin, res = cout, res * 2 if i > 0 else res
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, c.num_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class NearestCodeQuantizer(nn.Module):
    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, dim)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """[B, D, h, w] -> [B, h*w] nearest codebook indices (squared L2)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()
        emb = self.embedding.weight.float()
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ emb.t() + emb.pow(2).sum(1)[None]
        return dist.argmin(1).view(z.shape[0], -1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, N] -> [B, D, sqrt(N), sqrt(N)]."""
        b, n = codes.shape
        side = math.isqrt(n)
        return self.embedding(codes).view(b, side, side, -1).permute(0, 3, 1, 2)


class VQGAN(nn.Module):
    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.quantized_embed_dim, 1)
        self.quantize = NearestCodeQuantizer(config.num_embeddings, config.quantized_embed_dim)
        self.post_quant_conv = nn.Conv2d(config.quantized_embed_dim, config.z_channels, 1)

    def encode_codes(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.quantize.codes(self.quant_conv(self.encoder(pixels)))

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        z = self.quantize.lookup(codes).to(self.post_quant_conv.weight.dtype)
        return self.decoder(self.post_quant_conv(z))


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


class VQGANTokenizer:
    """`vqgan:<dir>`: a folder with config.json and model.safetensors or pytorch_model.bin."""

    kind = "vqgan"

    def __init__(self, model: VQGAN, spec: str, device: str | torch.device | None = None):
        self.model = model.eval().requires_grad_(False)
        self.spec = spec
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # bf16 on GPU for throughput; fp32 on CPU where bf16 convs are slow and less exact.
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model.to(self.device, self.dtype)
        self.model.quantize.float()  # nearest-code search stays in fp32
        if self.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)  # cuDNN's fast NHWC convolutions
        self.codebook_size = model.config.num_embeddings
        self.image_size = model.config.resolution
        self.tokens_per_image = model.config.latent_size**2

    @classmethod
    def from_dir(cls, path: str | Path, device=None) -> VQGANTokenizer:
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"vqgan tokenizer: {cfg_file} not found")
        config = VQGANConfig.from_dict(json.loads(cfg_file.read_text()))
        weights = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"vqgan tokenizer: no {' or '.join(WEIGHT_FILES)} in {path}")
        model = VQGAN(config)
        state = load_state_dict_file(weights)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"vqgan checkpoint {weights} does not match the VQGAN layout: "
                f"missing keys {sorted(missing)[:8]}{'...' if len(missing) > 8 else ''} ({len(missing)}), "
                f"unexpected keys {sorted(unexpected)[:8]}{'...' if len(unexpected) > 8 else ''} ({len(unexpected)})"
            )
        return cls(model, f"vqgan:{path}", device)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(self.device, self.dtype, non_blocking=True)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model.encode_codes(x).long().cpu()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        out = self.model.decode_codes(codes.to(self.device).long())
        return out.float().clamp_(0, 1).cpu()

    def describe(self) -> dict:
        return {"spec": self.spec, "kind": self.kind, "config": asdict(self.model.config)}

