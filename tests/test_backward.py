"""Every backward function against float64 central finite differences (no torch needed): random
inputs and a random upstream gradient g on tiny shapes, d/dx sum(g * f(x)) numerically for every
entry of every input and parameter, compared with what f_backward returns."""

from types import SimpleNamespace

import numpy as np
import pytest

from npvlm.model import attention as att
from npvlm.model import gemma, layers, loss, paligemma, siglip
from npvlm.model.masks import additive, prefix_lm_mask
from npvlm.model.rope import apply_rope, apply_rope_backward, rope_tables
from npvlm.tree import flatten, map_with_path

EPS = 1e-6
RTOL = 1e-6          # float64 central differences are exact to ~1e-9 relative on these sizes


def rng(seed=0):
    return np.random.default_rng(seed)


def numeric(f, x, eps=EPS):
    """d f / d x by central differences; f() reads x (perturbed in place)."""
    out = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        keep = x[i]
        x[i] = keep + eps
        up = f()
        x[i] = keep - eps
        down = f()
        x[i] = keep
        out[i] = (up - down) / (2 * eps)
    return out


NOISE = 1e-7        # central differences of an O(10) objective at EPS: ~1e-9 of rounding noise


def check(name, analytic, numerical):
    scale = max(np.abs(numerical).max(), 1e-12)
    err = np.abs(np.asarray(analytic) - numerical).max()
    print(f"{name:<40} max|analytic - numeric| = {err:.2e} (scale {scale:.2e})")
    assert err <= RTOL * scale + NOISE, name


def check_all(fwd, x, params, analytic_dx, analytic_grads, g):
    """Compare the input gradient and every parameter gradient with finite differences of
    L = sum(g * fwd())."""
    def objective():
        return float((g * fwd()).sum())
    if analytic_dx is not None:
        check("dx", analytic_dx, numeric(objective, x))
    leaves = flatten(analytic_grads)
    for path, leaf in flatten(params).items():
        if path in leaves:
            check(path, leaves[path].reshape(leaf.shape), numeric(objective, leaf))
    return leaves


def f64(shape, seed, scale=1.0):
    return rng(seed).normal(size=shape) * scale


# ---- elementwise and layer functions -------------------------------------------------------------

def test_linear():
    x, w, b, g = f64((2, 3, 5), 1), f64((4, 5), 2), f64((4,), 3), f64((2, 3, 4), 4)
    saved = {}
    layers.linear(x, w, b, save=saved)
    dx, grads = layers.linear_backward(g, saved, w, b)
    check_all(lambda: layers.linear(x, w, b), x, {"weight": w, "bias": b}, dx, grads, g)


def test_frozen_linear_keeps_nothing_and_gives_no_weight_gradient():
    x, w, g = f64((2, 5), 1), f64((4, 5), 2), f64((2, 4), 3)
    saved = {"frozen": True}
    layers.linear(x, w, save=saved)
    assert saved == {"frozen": True}
    dx, grads = layers.linear_backward(g, saved, w)
    assert grads == {}
    np.testing.assert_allclose(dx, g @ w)


def test_layer_norm():
    x, w, b, g = f64((2, 3, 6), 1), 1 + f64((6,), 2, 0.2), f64((6,), 3), f64((2, 3, 6), 4)
    saved = {}
    layers.layer_norm(x, w, b, 1e-6, save=saved)
    dx, grads = layers.layer_norm_backward(g, saved, w, b)
    check_all(lambda: layers.layer_norm(x, w, b, 1e-6), x, {"weight": w, "bias": b}, dx, grads, g)


def test_rms_norm_with_one_plus_weight():
    x, w, g = f64((2, 3, 6), 1), f64((6,), 2, 0.3), f64((2, 3, 6), 3)
    saved = {}
    layers.rms_norm(x, w, 1e-6, save=saved)
    dx, grads = layers.rms_norm_backward(g, saved, w)
    check_all(lambda: layers.rms_norm(x, w, 1e-6), x, {"weight": w}, dx, grads, g)


def test_gelu_softmax_softcap():
    x, g = f64((3, 7), 1, 2.0), f64((3, 7), 2)
    saved = {}
    layers.gelu_tanh(x, save=saved)
    check("gelu_tanh", layers.gelu_tanh_backward(g, saved), numeric(lambda: float((g * layers.gelu_tanh(x)).sum()), x))
    probs = layers.softmax(x)
    check("softmax", layers.softmax_backward(g, probs), numeric(lambda: float((g * layers.softmax(x)).sum()), x))
    y = layers.softcap(x, 1.5)
    check("softcap", layers.softcap_backward(g, y, 1.5), numeric(lambda: float((g * layers.softcap(x, 1.5)).sum()), x))


@pytest.mark.parametrize("Hq, Hk, cap", [(4, 1, None), (4, 2, None), (4, 2, 2.0), (2, 2, 1.0)])
def test_attention_grouped_masked_softcapped(Hq, Hk, cap):
    B, T, S, E = 2, 3, 4, 5
    q, k, v = f64((B, Hq, T, E), 1), f64((B, Hk, S, E), 2), f64((B, Hk, S, E), 3)
    allowed = rng(4).random((B, 1, T, S)) > 0.4
    allowed[..., 0] = True                                       # every query sees a key
    mask = additive(allowed, np.float64)
    cfg = SimpleNamespace(attn_scale=0.4, attn_logit_softcapping=cap)
    g = f64((B, T, Hq * E), 5)
    saved = {}
    att.attention(q, k, v, mask, cfg, save=saved)
    dq, dk, dv = att.attention_backward(g, saved, cfg)

    def objective():
        return float((g * att.attention(q, k, v, mask, cfg)).sum())
    for name, x, d in (("dq", q, dq), ("dk", k, dk), ("dv", v, dv)):
        check(name, d, numeric(objective, x))


def test_rope():
    x, g = f64((2, 3, 4, 8), 1), f64((2, 3, 4, 8), 2)
    rope = rope_tables(np.array([[1, 2, 3, 4], [1, 1, 2, 3]]), 8, 10000.0)
    check("apply_rope", apply_rope_backward(g, rope), numeric(lambda: float((g * apply_rope(x, rope)).sum()), x))


# ---- model pieces on a tiny config -----------------------------------------------------------------

def text_cfg(model_type="gemma", window=None):
    gemma2 = model_type == "gemma2"
    return SimpleNamespace(model_type=model_type, hidden_size=8, intermediate_size=12, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=4, rms_norm_eps=1e-6, rope_theta=10000.0,
                           attn_scale=(6 if gemma2 else 4) ** -0.5, attn_logit_softcapping=3.0 if gemma2 else None,
                           final_logit_softcapping=2.0 if gemma2 else None, sliding_window=window,
                           embed_scale=8 ** 0.5, vocab_size=11)


def layer_params(cfg, seed, gemma2=False):
    D, F, Hq, Hk, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    s = iter(range(seed, seed + 20))
    norms = ["input_layernorm", "post_attention_layernorm"] + (["pre_feedforward_layernorm",
                                                                "post_feedforward_layernorm"] if gemma2 else [])
    p = {n: {"weight": f64((D,), next(s), 0.3)} for n in norms}
    p["self_attn"] = {"q_proj": {"weight": f64((Hq * E, D), next(s), 0.5)},
                      "k_proj": {"weight": f64((Hk * E, D), next(s), 0.5)},
                      "v_proj": {"weight": f64((Hk * E, D), next(s), 0.5)},
                      "o_proj": {"weight": f64((D, Hq * E), next(s), 0.5)}}
    p["mlp"] = {"gate_proj": {"weight": f64((F, D), next(s), 0.5)}, "up_proj": {"weight": f64((F, D), next(s), 0.5)},
                "down_proj": {"weight": f64((D, F), next(s), 0.5)}}
    return p


@pytest.mark.parametrize("model_type, window", [("gemma", None), ("gemma2", 2)])
def test_gemma_layers(model_type, window):
    cfg = text_cfg(model_type, window)
    B, T = 2, 5
    p = layer_params(cfg, 10, model_type == "gemma2")
    h, g = f64((B, T, cfg.hidden_size), 1), f64((B, T, cfg.hidden_size), 2)
    am = np.array([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    # no gradient arrives at a left pad (no loss there, and no real token reads it); its query
    # row is fully masked, so in floating point its scores are absorbed by the mask value
    g[am == 0] = 0
    types = np.array([[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]])
    mask = prefix_lm_mask(am, types, np.float64, window)
    rope = rope_tables(np.where(am > 0, np.cumsum(am, 1), 1), cfg.head_dim, cfg.rope_theta)
    layer, backward = gemma.LAYERS[model_type], gemma.LAYER_BACKWARDS[model_type]
    saved = {}
    layer(h, p, cfg, rope, mask, save=saved)
    dh, grads = backward(g, saved, p, cfg, rope)
    leaves = check_all(lambda: layer(h, p, cfg, rope, mask), h, p, dh, grads, g)
    assert len(leaves) == len(flatten(p))


def test_siglip_layer_patch_embed_and_tower_to_the_pixels():
    vcfg = SimpleNamespace(hidden_size=6, intermediate_size=10, num_attention_heads=2, head_dim=3, layer_norm_eps=1e-6,
                           patch_size=2, num_channels=3, attn_scale=3 ** -0.5, attn_logit_softcapping=None)
    D, F = 6, 10
    s = iter(range(30, 80))

    def lin(o, i):
        return {"weight": f64((o, i), next(s), 0.5), "bias": f64((o,), next(s), 0.1)}

    def norm():
        return {"weight": 1 + f64((D,), next(s), 0.2), "bias": f64((D,), next(s), 0.1)}
    layer = {"layer_norm1": norm(), "self_attn": {n: lin(D, D) for n in ("q_proj", "k_proj", "v_proj", "out_proj")},
             "layer_norm2": norm(), "mlp": {"fc1": lin(F, D), "fc2": lin(D, F)}}
    p = {"patch_embedding": lin(D, 3 * 2 * 2), "position_embedding": {"weight": f64((4, D), next(s), 0.1)},
         "layers": [layer], "post_layernorm": norm()}
    pixels, g = f64((2, 3, 4, 4), 1), f64((2, 4, D), 2)
    saved = {}
    siglip.vision_tower(pixels, p, vcfg, save=saved)
    d_pixels, grads = siglip.vision_tower_backward(g, saved, p, vcfg, need_dx=True)
    leaves = check_all(lambda: siglip.vision_tower(pixels, p, vcfg), pixels, p, d_pixels, grads, g)
    assert len(leaves) == len(flatten(p))


def test_embeddings_merge_and_tied_head():
    cfg = SimpleNamespace(text=text_cfg("gemma2"), image_token_index=10, num_image_tokens=2)
    table = {"weight": f64((11, 8), 1, 0.5)}
    ids = np.array([[10, 10, 3, 3, 5], [10, 10, 7, 1, 0]])            # image tokens, a repeated id
    image = f64((2, 2, 8), 2)
    g = f64((2, 5, 8), 3)
    saved = {}
    paligemma.merge_embeddings(ids, image, table, cfg, save=saved)
    d_image, d_table = paligemma.merge_embeddings_backward(g, saved, table, cfg)
    check("d image tokens", d_image, numeric(lambda: float((g * paligemma.merge_embeddings(ids, image, table, cfg)).sum()), image))
    check("d embedding (lookup)", d_table["weight"],
          numeric(lambda: float((g * paligemma.merge_embeddings(ids, image, table, cfg)).sum()), table["weight"]))
    h, gl = f64((3, 8), 4), f64((3, 11), 5)
    saved = {}
    gemma.lm_head(h, table, cfg.text, save=saved)
    dh, grads = gemma.lm_head_backward(gl, saved, table, cfg.text)
    check_all(lambda: gemma.lm_head(h, table, cfg.text), h, table, dh, grads, gl)


def test_cross_entropy_weights_and_targets():
    logits = f64((4, 7), 1, 2.0)
    targets, weights = np.array([1, 6, 6, 0]), np.array([0.5, 0.25, 0.125, 0.125])
    saved = {}
    loss.cross_entropy(logits, targets, weights, save=saved)
    check("cross_entropy", loss.cross_entropy_backward(1.0, saved),
          numeric(lambda: float(loss.cross_entropy(logits, targets, weights)), logits))


def test_whole_training_loss_in_float64(tmp_path):
    """forward_loss + backward of a whole (tiny, random) model in float64, against central
    differences on a few entries of tensors from every part of the model."""
    import npvlm
    from npvlm.training.grads import loss_and_grads

    from helpers import write_random_model
    model = npvlm.load(write_random_model(tmp_path / "m", seed=3))
    params = map_with_path(lambda _, a: np.asarray(a, np.float64), model.params)
    batch = model.processor([np.full((28, 28, 3), 90, np.uint8), np.zeros((28, 28, 3), np.uint8)],
                            ["caption en", "a b"], ["x y z", "w"])
    batch["pixel_values"] = batch["pixel_values"].astype(np.float64)
    _, grads = loss_and_grads(batch, params, model.cfg, "all", "example")
    grads, flat = flatten(grads), flatten(params)
    for path in ("projector.weight", "text.layers.0.self_attn.q_proj.weight", "text.layers.1.mlp.down_proj.weight",
                 "text.embed_tokens.weight", "text.norm.weight", "vision.position_embedding.weight",
                 "vision.layers.0.mlp.fc1.bias", "vision.patch_embedding.weight"):
        x, g = flat[path], grads[path]
        picks = list(zip(*np.unravel_index(rng(len(path)).choice(x.size, 4, replace=False), x.shape)))
        if path == "text.embed_tokens.weight":                      # rows the batch uses
            picks = [(int(batch["input_ids"][1, -1]), 0), (int(batch["labels"][0, -1]), 3)]
        for i in picks:
            keep = x[i]
            x[i] = keep + EPS
            up = float(paligemma.forward_loss(batch, params, model.cfg))
            x[i] = keep - EPS
            down = float(paligemma.forward_loss(batch, params, model.cfg))
            x[i] = keep
            numeric_i = (up - down) / (2 * EPS)
            print(f"{path}{list(i)}: analytic {g[i]:+.9f} numeric {numeric_i:+.9f}")
            assert abs(g[i] - numeric_i) <= 1e-6 * max(1.0, abs(numeric_i)), path
