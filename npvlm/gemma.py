"""Gemma decoders: Gemma 1 (PaliGemma 1, docs/spec.md §9) and Gemma 2 (PaliGemma 2, §10).

Axes (npvlm/layers.py): B batch, T tokens in this pass, S keys (cached + new), D width,
F MLP width, Hq query heads, Hk key/value heads, E head dim, V vocab.

    h = merged embeddings [B, T, D]
    Gemma 1, each layer:  h += attn(N(h));  h += geglu(N(h))
    Gemma 2, each layer:  h += N(attn(N(h)));  h += N(geglu(N(h)))   (softcapped attention)
    logits = N(h) @ embed_tokens^T       (lm_head tied to the embedding; Gemma 2 softcaps it)

A block takes `rope = (cos, sin)` for its T positions, the additive `mask` [B, 1, T, S] and `kv`,
its own slot of the KV cache (None: attend to this pass's keys only, as in training).

Follows HF `modeling_gemma.py` / `modeling_gemma2.py` (transformers 5.x); the numerics that
matter are commented where they happen.
"""

from .attention import attention
from .backend import array_module
from .layers import gelu_tanh, linear, rms_norm, softcap, sub
from .rope import apply_rope
from .siglip import split_heads


def embed_tokens(ids, p, cfg):
    """Token embeddings times sqrt(D). The constant is cast to the activation dtype first
    (fp32: 45.254834 for D=2048), as HF's `GemmaTextScaledWordEmbedding` does.
    ids: int[B, T], p: {"weight": [V, D]} -> [B, T, D]"""
    table = p["weight"]
    xp = array_module(ids)
    return table[ids] * xp.asarray(cfg.embed_scale, dtype=table.dtype)


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


def geglu(x, p, *, save=None):
    """down(gelu_tanh(gate(x)) * up(x)).  [B, T, D] -> [B, T, F] -> [B, T, D]"""
    g = gelu_tanh(linear(x, **p["gate_proj"], save=sub(save, "gate_proj")), save=sub(save, "gelu"))
    u = linear(x, **p["up_proj"], save=sub(save, "up_proj"))
    if save is not None:
        save["up"] = u
    return linear(g * u, **p["down_proj"], save=sub(save, "down_proj"))


def gemma_block(h, p, cfg, rope, mask, kv=None, *, save=None):
    """Gemma 1 layer: two pre-norm residual branches.  [B, T, D] -> [B, T, D]
    (big_vision calls `post_attention_layernorm` `pre_ffw_norm`: it normalises the MLP input.)"""
    eps = cfg.rms_norm_eps
    x = rms_norm(h, **p["input_layernorm"], eps=eps, save=sub(save, "input_layernorm"))
    h = h + self_attention(x, p["self_attn"], cfg, rope, mask, kv, save=sub(save, "self_attn"))
    x = rms_norm(h, **p["post_attention_layernorm"], eps=eps, save=sub(save, "post_attention_layernorm"))
    return h + geglu(x, p["mlp"], save=sub(save, "mlp"))


def gemma2_block(h, p, cfg, rope, mask, kv=None, *, save=None):
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


BLOCKS = {"gemma": gemma_block, "gemma2": gemma2_block}


def lm_head(h, p, cfg, *, save=None):
    """Logits against the tied embedding p = {"weight": [V, D]}; Gemma 2 softcaps them
    (cap * tanh(logits / cap), as transformers 5.x does). h is the final-normed hidden state.
    [..., D] -> [..., V]"""
    logits = linear(h, p["weight"], save=save)                          # h @ E^T
    if cfg.final_logit_softcapping is not None:
        logits = softcap(logits, cfg.final_logit_softcapping)
    return logits
