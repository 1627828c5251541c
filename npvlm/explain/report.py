"""An explanation as a page a person reads (`npvlm IMAGE PROMPT --explain report.html`) and as
PNG files for scripts (`--explain-dir DIR`).

The page is one self-contained HTML file (the template npvlm/explain/report.html, its script
inside): no network request, the image and every map embedded. It shows the image the vision
tower saw (the R x R preprocessed image) under a heatmap for the selected answer token, the
answer tokens as chips with their probabilities (click one to select it), the map kinds of
npvlm/explain/maps.py (gradient per pixel and per patch, input x gradient per patch, attention
by layer and head and their means), the logit-lens table (each layer's top-k tokens and the
selected token's rank) and, when the answer has <loc> tokens, the boxes. The page sets
`data-token`, `data-kind` and `data-signature` (a checksum of the heatmap's drawn pixels) on the
heatmap so a browser test can see a click change it. Its content-security policy allows no
request and no script but its own (by its SHA-256), and its data holds no "<", ">" or "&", so
no text (a prompt, a token) can end the data or run as code.
"""

import base64
import hashlib
import io
import json
import os
import re
import secrets
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from ..saving.atomic import check_new_folder, write_text_atomic
from ..tasks.detection import parse_detections
from .maps import MAP_KINDS, gradient_saliency, normalised, patch_map

# a perceptual ramp (dark -> light, roughly matplotlib's "inferno") and a diverging one
# (blue -> white -> red), as anchor colors; the page's script uses the same anchors
SEQUENTIAL = [(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)]
DIVERGING = [(33, 102, 172), (146, 197, 222), (247, 247, 247), (244, 165, 130), (178, 24, 43)]


def colorize(m, signed=False):
    """A map scaled to [0, 1] (or [-1, 1] when signed) -> uint8 RGBA [..., 4]: the ramp's color,
    and an opacity that grows with |value| (0 shows the image as it is)."""
    anchors = np.asarray(DIVERGING if signed else SEQUENTIAL, np.float32)
    t = (np.clip(m, -1, 1) + 1) / 2 if signed else np.clip(m, 0, 1)
    x = t * (len(anchors) - 1)
    i = np.minimum(x.astype(int), len(anchors) - 2)
    f = (x - i)[..., None]
    rgb = anchors[i] * (1 - f) + anchors[i + 1] * f
    alpha = 255 * np.minimum(1.0, np.abs(np.clip(m, -1, 1)))[..., None]
    return np.concatenate([rgb, alpha], axis=-1).round().astype(np.uint8)


def overlay(view, heat):
    """The image under an RGBA heatmap of the same size (alpha blending). -> uint8 RGB"""
    a = heat[..., 3:4].astype(np.float32) / 255
    return (view.astype(np.float32) * (1 - a) + heat[..., :3].astype(np.float32) * a).round().astype(np.uint8)


def model_view(exp):
    """The preprocessed image the vision tower saw, back to RGB uint8 [R, R, 3]."""
    return np.clip((exp.pixel_values.transpose(1, 2, 0) * 0.5 + 0.5) * 255, 0, 255).round().astype(np.uint8)


def png_data_uri(rgb):
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _round(a, digits=4):
    """Floats with `digits` significant digits, as nested lists (a smaller page)."""
    a = np.asarray(a, np.float64)
    return json.loads(json.dumps(np.vectorize(lambda v: float(f"{v:.{digits}g}"))(a).tolist())) if a.size else []


def report_data(exp, tokenizer, model_name="", divisor=1024):
    """Everything the page shows, as JSON-ready values."""
    n, L, H, N = exp.image_attention.shape
    side = int(round(N ** 0.5))
    R = exp.pixel_values.shape[-1]

    def piece(t):
        return tokenizer.decode([t]) or tokenizer.piece(t) or f"<{t}>"
    boxes = []
    if "<loc" in exp.text:
        found = parse_detections(exp.text, R, R, divisor)
        boxes = [{"label": o.label, "box": [round(v, 2) for v in o.box]} for o in found.objects]
    return {
        "model": model_name, "prompt": exp.prompt, "answer": exp.text, "R": R, "side": side,
        "layers": L, "heads": H, "image": png_data_uri(model_view(exp)),
        "tokens": [{"id": t, "text": txt, "prob": float(np.exp(lp))}
                   for t, txt, lp in zip(exp.tokens, exp.token_texts, exp.logprobs.tolist())],
        "maps": {
            "gradient": [_round(normalised(patch_map(exp, i, "gradient")).reshape(-1)) for i in range(n)],
            "input_x_gradient": [_round(normalised(patch_map(exp, i, "input_x_gradient")).reshape(-1))
                                 for i in range(n)],
            "attention": attention_bytes(exp.image_attention),
        },
        "pixel_gradient": [png_data_uri(colorize(normalised(gradient_saliency(exp, i)))) for i in range(n)],
        "lens": {
            "prob": _round(np.exp(exp.logit_lens)), "rank": exp.lens_rank.tolist(),
            "top_text": [[[piece(int(t)) for t in row] for row in tok] for tok in exp.lens_top_ids],
            "top_prob": _round(np.exp(exp.lens_top_logprobs)),
        },
        "boxes": boxes,
        "ramps": {"sequential": SEQUENTIAL, "diverging": DIVERGING},
    }


def attention_bytes(a):
    """The attention maps [n, L, H, N] for display, compactly: each map scaled to its maximum
    and rounded to 8 bits (base64), with the maxima: 1/4 of a float's bytes, and ~1/20 of JSON
    text (the page shows heatmaps; the exact values are in the Explanation)."""
    scale = a.max(axis=-1, keepdims=True)
    q = np.where(scale > 0, np.round(255 * a / np.where(scale > 0, scale, 1)), 0).astype(np.uint8)
    return {"shape": list(a.shape), "scale": _round(scale[..., 0]),
            "q": base64.b64encode(q.tobytes()).decode("ascii")}


def write_report(exp, tokenizer, path, model_name="", divisor=1024):
    """Write the page atomically to `path` (checked writable, never an input, by the caller);
    divisor: how <loc> bins map to pixels (npvlm.tasks.detection)."""
    data = json.dumps(report_data(exp, tokenizer, model_name, divisor), ensure_ascii=True, separators=(",", ":"))
    # no "<", ">" or "&" in the page's data: it can neither end its script element nor start a
    # comment or a tag the HTML parser would act on (JSON reads the escapes back as the characters)
    data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    page = (Path(__file__).with_name("report.html")).read_text(encoding="utf-8")
    script = page[page.rindex("<script>") + len("<script>"):page.rindex("</script>")]
    values = {"__DATA__": data, "__TITLE__": _html(exp.prompt),
              "__SCRIPT_HASH__": base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")}
    page = re.sub("__DATA__|__TITLE__|__SCRIPT_HASH__", lambda m: values[m.group(0)], page)   # one pass
    write_text_atomic(path, page)


def _html(text):
    return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;"))


def write_maps(exp, folder):
    """`--explain-dir`: for each answer token i and map kind, `{i:02d}_{kind}.png`, the model's
    view of the image under the map (upscaled to at least 256 px, nearest), plus explanation.json
    (tokens, texts, log-probabilities, the logit lens, the files). `folder` must not exist or be
    empty; it is filled in a temporary folder beside it, then renamed, so it is whole or absent."""
    folder = check_new_folder(folder)
    parent = folder.parent if str(folder.parent) else Path(".")
    tmp = parent / f".{folder.name}.{secrets.token_hex(6)}.tmp"
    tmp.mkdir()
    try:
        view = model_view(exp)
        R = view.shape[0]
        scale = max(1, -(-256 // R))
        files = []
        for i in range(len(exp.tokens)):
            for kind in MAP_KINDS:
                m = normalised(patch_map(exp, i, kind))
                signed = kind == "input_x_gradient"
                heat = colorize(np.kron(m, np.ones((R // m.shape[0],) * 2, np.float32)), signed)
                heat = np.pad(heat, ((0, R - heat.shape[0]), (0, R - heat.shape[1]), (0, 0)), mode="edge")
                rgb = overlay(view, heat)
                name = f"{i:02d}_{kind}.png"
                Image.fromarray(rgb).resize((R * scale, R * scale), Image.NEAREST).save(tmp / name)
                files.append({"token": i, "kind": kind, "file": name})
        record = {"prompt": exp.prompt, "answer": exp.text, "tokens": exp.tokens, "token_texts": exp.token_texts,
                  "logprobs": exp.logprobs.tolist(), "logit_lens": exp.logit_lens.tolist(),
                  "lens_rank": exp.lens_rank.tolist(), "files": files}
        (tmp / "explanation.json").write_text(json.dumps(record, indent=1) + "\n")
        if folder.exists():
            folder.rmdir()                                     # empty, checked above
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
