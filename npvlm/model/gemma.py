"""Gemma decoders: Gemma 1 (PaliGemma 1, docs/spec.md §9) and Gemma 2 (PaliGemma 2, §10).

Axes (npvlm/model/layers.py): B batch, T tokens in this pass, S keys (cached + new), D width,
F MLP width, Hq query heads, Hk key/value heads, E head dim, V vocab.

    h = merged embeddings [B, T, D]
    Gemma 1, each layer:  h += attn(N(h));  h += geglu(N(h))
    Gemma 2, each layer:  h += N(attn(N(h)));  h += N(geglu(N(h)))   (softcapped attention)
    logits = N(h) @ embed_tokens^T       (lm_head tied to the embedding; Gemma 2 softcaps it)

A layer takes `rope = (cos, sin)` for its T positions, the additive `mask` [B, 1, T, S] and `kv`,
its own slot of the KV cache (None: attend to this pass's keys only, as in training).

Follows HF `modeling_gemma.py` / `modeling_gemma2.py` (transformers 5.x); the numerics that
matter are commented where they happen.
"""

from ..backend import array_module, scatter_add
from .attention import attention, attention_backward, projections_backward, split_heads
from .layers import (
    gelu_tanh,
    gelu_tanh_backward,
    gelu_tanh_inner,
    linear,
    linear_backward,
    rms_norm,
    rms_norm_backward,
    rows,
    softcap,
    softcap_backward,
)
from .record import sub, trains
from .rope import apply_rope, apply_rope_backward


def embed_tokens(ids, p, cfg, *, save=None):
    """Token embeddings times sqrt(D). The constant is cast to the activation dtype first
    (fp32: 45.254834 for D=2048), as HF's `GemmaTextScaledWordEmbedding` does.
    ids: int[B, T], p: {"weight": [V, D]} -> [B, T, D]. save: keeps the ids."""
    table = p["weight"]
    xp = array_module(ids)
    if save is not None:
        save["ids"] = ids
    return table[ids] * xp.asarray(cfg.embed_scale, dtype=table.dtype)


def embed_tokens_backward(dy, saved, p, cfg):
    """The gradient of the embedding table: row ids[b, t] receives dy[b, t] * sqrt(D), summed
    over repeats (a scatter-add); none when frozen. Token ids have no gradient (dx is None).
    dy: [B, T, D] -> None, {"weight": [V, D]}"""
    if not trains(saved, "weight"):
        return None, {}
    ids = saved["ids"]
    xp = array_module(dy)
    d_table = xp.zeros(p["weight"].shape, dtype=dy.dtype)
    scale = xp.asarray(cfg.embed_scale, dtype=dy.dtype)
    scatter_add(d_table, ids.reshape(-1), rows(dy * scale))
    return None, {"weight": d_table}


def key_values(x, p, cfg, rope, *, save=None):
    """This pass's keys (after RoPE) and values. x: [B, T, D] -> k, v: [B, Hk, T, E] each."""
    k = split_heads(linear(x, **p["k_proj"], save=sub(save, "k_proj")), cfg.num_key_value_heads)
    v = split_heads(linear(x, **p["v_proj"], save=sub(save, "v_proj")), cfg.num_key_value_heads)
    return apply_rope(k, rope), v


def self_attention(x, p, cfg, rope, mask, kv=None, *, save=None):
    """Prefix-LM attention with RoPE on q and k; with a cache slot `kv`, this pass's keys and
    values are written there and the queries attend to everything it holds.
    x: [B, T, D] -> [B, T, D]"""
    q = apply_rope(split_heads(linear(x, **p["q_proj"], save=sub(save, "q_proj")),
                               cfg.num_attention_heads), rope)               # [B, Hq, T, E]
    k, v = key_values(x, p, cfg, rope, save=save)                            # [B, Hk, T, E]
    if kv is not None:
        k, v = kv.write(k, v)                                                # [B, Hk, S, E]
    out = attention(q, k, v, mask, cfg, save=sub(save, "attn"))              # [B, T, Hq*E]
    return linear(out, **p["o_proj"], save=sub(save, "o_proj"))


def self_attention_backward(dy, saved, p, cfg, rope):
    """Back through o_proj, attention, RoPE and the q/k/v projections (no cache: a training pass).
    dy: [B, T, D] -> dx [B, T, D], grads {"q_proj": ..., "k_proj": ..., "v_proj": ..., "o_proj": ...}
    (only the trained ones)"""
    d_out, g_o = linear_backward(dy, saved["o_proj"], **p["o_proj"])
    dq, dk, dv = attention_backward(d_out, saved["attn"], cfg)
    dq, dk = apply_rope_backward(dq, rope), apply_rope_backward(dk, rope)
    dx, grads = projections_backward({"q_proj": dq, "k_proj": dk, "v_proj": dv}, saved, p)
    return dx, dict(grads, o_proj=g_o) if g_o else grads


def geglu(x, p, *, save=None):
    """down(gelu_tanh(gate(x)) * up(x)).  [B, T, D] -> [B, T, F] -> [B, T, D]"""
    g = gelu_tanh(linear(x, **p["gate_proj"], save=sub(save, "gate_proj")), save=sub(save, "gelu"))
    u = linear(x, **p["up_proj"], save=sub(save, "up_proj"))
    if save is not None:
        save["up"] = u
    g *= u            # g * u in place: g is the GELU's own new array, and [T, F] is the largest
    return linear(g, **p["down_proj"], save=sub(save, "down_proj"))


def geglu_backward(dy, saved, p):
    """y = down(g u) with g = gelu(gate(x)), u = up(x):  dg = dm u, du = dm g (dm: through
    down_proj), then back through the GELU and both projections; g = 0.5 x (1 + tanh) is
    recomputed from the GELU's saved input. dy: [B, T, D] -> dx [B, T, D], grads by projection."""
    dm, g_down = linear_backward(dy, saved["down_proj"], **p["down_proj"])
    gx = saved["gelu"]["x"]
    t = gelu_tanh_inner(gx)
    g = 0.5 * gx * (1.0 + t)
    d_gate = gelu_tanh_backward(dm * saved["up"], saved["gelu"], tanh=t)
    dx_gate, g_gate = linear_backward(d_gate, saved["gate_proj"], **p["gate_proj"])
    dx_up, g_up = linear_backward(dm * g, saved["up_proj"], **p["up_proj"])
    grads = {"gate_proj": g_gate, "up_proj": g_up, "down_proj": g_down}
    return dx_gate + dx_up, {k: v for k, v in grads.items() if v}


def gemma_layer(h, p, cfg, rope, mask, kv=None, *, save=None):
    """Gemma 1 layer: two pre-norm residual branches.  [B, T, D] -> [B, T, D]
    (big_vision calls `post_attention_layernorm` `pre_ffw_norm`: it normalises the MLP input.)"""
    eps = cfg.rms_norm_eps
    x = rms_norm(h, **p["input_layernorm"], eps=eps, save=sub(save, "input_layernorm"))
    h = h + self_attention(x, p["self_attn"], cfg, rope, mask, kv, save=sub(save, "self_attn"))
    x = rms_norm(h, **p["post_attention_layernorm"], eps=eps, save=sub(save, "post_attention_layernorm"))
    return h + geglu(x, p["mlp"], save=sub(save, "mlp"))


def gemma2_layer(h, p, cfg, rope, mask, kv=None, *, save=None):
    """Gemma 2 layer.  [B, T, D] -> [B, T, D]  What differs from Gemma 1: each branch output is
    RMS-normalised again before it joins the residual (`post_attention_layernorm` is a real
    *post* norm here, and `post_feedforward_layernorm` is new); the MLP input norm is
    `pre_feedforward_layernorm`. Inside attention (same function): scale
    query_pre_attn_scalar**-0.5, logits softcapped before the mask, and a sliding-window mask on
    the layers that slide (the caller picks the mask)."""
    eps = cfg.rms_norm_eps
    x = rms_norm(h, **p["input_layernorm"], eps=eps, save=sub(save, "input_layernorm"))
    a = self_attention(x, p["self_attn"], cfg, rope, mask, kv, save=sub(save, "self_attn"))
    h = h + rms_norm(a, **p["post_attention_layernorm"], eps=eps, save=sub(save, "post_attention_layernorm"))
    x = rms_norm(h, **p["pre_feedforward_layernorm"], eps=eps, save=sub(save, "pre_feedforward_layernorm"))
    m = geglu(x, p["mlp"], save=sub(save, "mlp"))
    return h + rms_norm(m, **p["post_feedforward_layernorm"], eps=eps, save=sub(save, "post_feedforward_layernorm"))


def _norm_back(dy, saved, p, name, grads):
    dx, g = rms_norm_backward(dy, saved[name], **p[name])
    if g:
        grads[name] = g
    return dx


def gemma_layer_backward(dh, saved, p, cfg, rope):
    """Back through `gemma_layer`: each residual branch adds its input gradient to the stream's.
    dh: [B, T, D] (gradient of the layer's output) -> dh of its input [B, T, D], grads."""
    grads = {}
    dx, grads["mlp"] = geglu_backward(dh, saved["mlp"], p["mlp"])
    dh = dh + _norm_back(dx, saved, p, "post_attention_layernorm", grads)
    dx, grads["self_attn"] = self_attention_backward(dh, saved["self_attn"], p["self_attn"], cfg, rope)
    dh = dh + _norm_back(dx, saved, p, "input_layernorm", grads)
    return dh, {k: g for k, g in grads.items() if g}


def gemma2_layer_backward(dh, saved, p, cfg, rope):
    """Back through `gemma2_layer`: as Gemma 1, with the post-norms of both branches on the way.
    dh: [B, T, D] -> [B, T, D], grads."""
    grads = {}
    dm = _norm_back(dh, saved, p, "post_feedforward_layernorm", grads)
    dx, grads["mlp"] = geglu_backward(dm, saved["mlp"], p["mlp"])
    dh = dh + _norm_back(dx, saved, p, "pre_feedforward_layernorm", grads)
    da = _norm_back(dh, saved, p, "post_attention_layernorm", grads)
    dx, grads["self_attn"] = self_attention_backward(da, saved["self_attn"], p["self_attn"], cfg, rope)
    dh = dh + _norm_back(dx, saved, p, "input_layernorm", grads)
    return dh, {k: g for k, g in grads.items() if g}


# the decoder layer of each model_type, and its backward
LAYERS = {"gemma": gemma_layer, "gemma2": gemma2_layer}
LAYER_BACKWARDS = {"gemma": gemma_layer_backward, "gemma2": gemma2_layer_backward}


def lm_head(h, p, cfg, *, save=None):
    """Logits against the tied embedding p = {"weight": [V, D]}; Gemma 2 softcaps them
    (cap * tanh(logits / cap), as transformers 5.x does). h is the final-normed hidden state.
    [..., D] -> [..., V]"""
    logits = linear(h, p["weight"], save=save)                          # h @ E^T
    if cfg.final_logit_softcapping is not None:
        logits = softcap(logits, cfg.final_logit_softcapping)
        if save is not None:
            save["capped"] = logits
    return logits


def lm_head_backward(dlogits, saved, p, cfg):
    """Back through the softcap and the tied projection: dh = dz E, and dE = dz^T h when the
    embedding is trained (the tied head's share of its gradient; the lookup adds the other).
    dlogits: [..., V] -> dh [..., D], {"weight": [V, D]}"""
    if cfg.final_logit_softcapping is not None:
        dlogits = softcap_backward(dlogits, saved["capped"], cfg.final_logit_softcapping)
    return linear_backward(dlogits, saved, p["weight"])
