"""Write the tiny VQ-VAE fixture and its PyTorch golden masks (dev only: needs torch).

    python tests/make_vae_fixture.py [--out tests/fixtures/vae]

Writes
    <out>/vae-tiny.npz       random weights under the official vae-oid.npz key names and
                             PyTorch layouts (`_vq_vae._embedding` [128, D], `decoder.*`), float32
    <out>/golden_masks.npz   `codes` int32[B, 16], `masks` float32[B, 64, 64] from PyTorch,
                             `meta` (a JSON string: versions, seed, D, this command)

The reference is a PyTorch `nn.Sequential` whose state_dict keys are exactly the official ones
(docs/spec.md §13.2; the ComfyUI PaliGemma port loads vae-oid.npz into such a Sequential): Conv2d,
ResBlock(net = Sequential(conv3x3, ReLU, conv3x3, ReLU, conv1x1)) + residual, ConvTranspose2d
(4, stride 2, padding 1). Its forward is big_vision's `reconstruct_masks` in NCHW.

Size: the channel widths (128/64/32/16) are fixed by the official layout, so the decoder has
~1.07 M weights whatever D is (4.3 MB as float32). To keep the committed file small, every weight
tensor is ternary, {-s, 0, +s} with a per-tensor s (He-scaled), and the file is deflated; biases
and the codebook stay continuous-valued. Ternary weights catch the same layout mistakes (a
missing flip, swapped in/out axes, a transposed grid) as Gaussian ones. The live test
(tests/test_segmentation.py) also builds a Gaussian-weight decoder with another D.

Deterministic: the same torch/numpy versions give byte-identical files (fixed zip timestamps).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import zipfile

import numpy as np
import torch
from torch import nn

FORMAT_VERSION = 1
SEED = 20240514
D_FIXTURE = 64          # code width of the fixture (the real file's D is read from it)
N_GOLDEN = 6            # golden masks
OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "vae")
COMMAND = "python tests/make_vae_fixture.py  (needs: pip install -e '.[reference]')"


class ResBlock(nn.Module):
    """big_vision `ResBlock`; the `net` attribute gives the official `decoder.2.net.{0,2,4}` names."""

    def __init__(self, width):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(width, width, 1))

    def forward(self, x):
        return x + self.net(x)


class MaskVAE(nn.Module):
    """Codebook + decoder; state_dict keys `_vq_vae._embedding`, `decoder.0.weight`, ..."""

    def __init__(self, D):
        super().__init__()
        self._vq_vae = nn.Module()
        self._vq_vae._embedding = nn.Parameter(torch.zeros(128, D))
        def up(i, o):
            return [nn.ConvTranspose2d(i, o, 4, stride=2, padding=1), nn.ReLU()]
        self.decoder = nn.Sequential(
            nn.Conv2d(D, 128, 1), nn.ReLU(),                        # 0, 1
            ResBlock(128), ResBlock(128),                           # 2, 3
            *up(128, 128), *up(128, 64), *up(64, 32), *up(32, 16),  # 4..11
            nn.Conv2d(16, 1, 1))                                    # 12

    def embed(self, codes):
        """int[B, 16] -> [B, D, 4, 4]: the 4x4 grid, row-major, channels first."""
        B, D = codes.shape[0], self._vq_vae._embedding.shape[1]
        return self._vq_vae._embedding[codes.reshape(-1)].reshape(B, 4, 4, D).permute(0, 3, 1, 2)

    def forward(self, codes):
        return self.decoder(self.embed(codes))[:, 0]               # [B, 64, 64]


def _ternary(shape, fan_in, gen):
    """{-s, 0, +s}, each with probability 1/3, variance 2/fan_in (He)."""
    s = (3.0 / fan_in) ** 0.5
    return (torch.randint(-1, 2, shape, generator=gen).float() * s)


def build(D, seed, ternary=True, out_std=0.5):
    """A random MaskVAE in eval mode. The last conv is rescaled so the masks have std `out_std`
    and about 45 % positive pixels on random codes (not saturated, not all one sign)."""
    gen = torch.Generator().manual_seed(seed)
    model = MaskVAE(D).eval()
    with torch.no_grad():
        model._vq_vae._embedding.copy_(torch.randn(128, D, generator=gen))
        for name, m in model.decoder.named_modules():
            if not isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                continue
            in_ch = m.weight.shape[1] if isinstance(m, nn.Conv2d) else m.weight.shape[0]
            taps = m.weight.shape[2] * m.weight.shape[3]
            # a stride-2 transposed conv reaches each output pixel with 2x2 of its 4x4 taps
            fan_in = in_ch * (taps if isinstance(m, nn.Conv2d) else taps // 4)
            gain = 0.5 if name.endswith("net.4") else 1.0            # keep the residual sum moderate
            w = (_ternary(m.weight.shape, fan_in, gen) if ternary
                 else torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            m.weight.copy_(w * gain)
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.05)
        calib = torch.randint(0, 128, (64, 16), generator=gen)
        last = model.decoder[12]
        y = model(calib) - last.bias
        last.weight.mul_(out_std / y.std())
        last.bias.copy_(-torch.quantile((y * (out_std / y.std())).flatten(), 0.55))
    return model


def state_arrays(model):
    """The official-layout npz contents: {key: float32 array}."""
    return {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}


def torch_stages(model, codes):
    """The reference forward, stage by stage, channels-last (NHWC) float32 arrays named as
    npvlm.tasks.segmentation.decode_masks' trace names."""
    dec = model.decoder
    with torch.no_grad():
        x = model.embed(torch.as_tensor(np.asarray(codes), dtype=torch.long))
        out = {"vae.embed": x}
        x = out["vae.conv_in"] = dec[1](dec[0](x))
        x = out["vae.res.0"] = dec[2](x)
        x = out["vae.res.1"] = dec[3](x)
        for i, j in enumerate((4, 6, 8, 10)):
            x = out[f"vae.up.{i}"] = dec[j + 1](dec[j](x))
        out["vae.mask"] = dec[12](x)
    nhwc = {k: v.permute(0, 2, 3, 1).numpy().astype(np.float32) for k, v in out.items()}
    nhwc["vae.mask"] = nhwc["vae.mask"][..., 0]
    return nhwc


def save_npz(path, arrays):
    """np.savez_compressed with fixed zip timestamps, so reruns are byte-identical."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for key, a in arrays.items():
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            npy = io.BytesIO()
            np.lib.format.write_array(npy, np.asarray(a), allow_pickle=False)
            z.writestr(info, npy.getvalue(), compresslevel=9)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def golden_codes(seed):
    rng = np.random.default_rng(seed)
    rows = [np.arange(16), 127 - np.arange(16) * 8, np.zeros(16, int)]   # grid order, extremes
    rows += list(rng.integers(0, 128, size=(N_GOLDEN - len(rows), 16)))
    return np.stack(rows).astype(np.int32)


def sanity_check(masks):
    """Refuse degenerate goldens: each mask must have both signs and be far from saturation."""
    problems = []
    for i, m in enumerate(masks):
        pos = float((m > 0).mean())
        if not 0.1 < pos < 0.9:
            problems.append(f"mask {i}: {pos:.0%} positive")
        if not 0.1 < float(m.std()) < 2.0:
            problems.append(f"mask {i}: std {m.std():.3f}")
    if problems:
        sys.exit("sanity check failed, not writing: " + "; ".join(problems))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    torch.manual_seed(SEED)
    model = build(D_FIXTURE, SEED)
    codes = golden_codes(SEED)
    masks = torch_stages(model, codes)["vae.mask"]
    sanity_check(masks)
    meta = {"format_version": FORMAT_VERSION, "seed": SEED, "D": D_FIXTURE, "weights": "ternary",
            "versions": {"torch": torch.__version__.split("+")[0], "numpy": np.__version__},
            "regenerate": COMMAND,
            "mask_stats": {"min": float(masks.min()), "max": float(masks.max()),
                           "std": float(masks.std()), "positive": float((masks > 0).mean())}}
    os.makedirs(args.out, exist_ok=True)
    save_npz(os.path.join(args.out, "vae-tiny.npz"), state_arrays(model))
    save_npz(os.path.join(args.out, "golden_masks.npz"),
             {"codes": codes, "masks": masks, "meta": np.array(json.dumps(meta, sort_keys=True))})
    for name in ("vae-tiny.npz", "golden_masks.npz"):
        print(f"{os.path.join(args.out, name)}: {os.path.getsize(os.path.join(args.out, name)) / 1e3:.0f} kB")
    print(json.dumps(meta["mask_stats"]))


if __name__ == "__main__":
    main()
