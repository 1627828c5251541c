"""Gemma decoders: Gemma 1 (PaliGemma 1, spec §9) and Gemma 2 (PaliGemma 2, spec §10).

Axis legend: B batch, T query length, S key length, D width, F MLP width, Hq query heads,
Hk key/value heads, E head dim, V vocab.

    h = merged embeddings [B, T, D]
    Gemma 1, each layer:  h += attn(N(h));  h += geglu(N(h))
    Gemma 2, each layer:  h += N(attn(N(h)));  h += N(geglu(N(h)))   (softcapped attention)
    logits = N(h) @ embed_tokens^T       (lm_head tied to the embedding; Gemma 2 softcaps it)

Follows HF `modeling_gemma.py` / `modeling_gemma2.py` (transformers 5.x); the numerics that
matter are commented where they happen.
"""

from .attention import apply_rope, attention
from .backend import array_module
from .bf16 import matmul_t
from .layers import gelu_tanh, linear, rms_norm, softcap


def embed_tokens(ids, table, cfg):
    """Token embeddings times sqrt(D). The constant is cast to the activation dtype first
    (fp32: 45.254834 for D=2048), as HF's `GemmaTextScaledWordEmbedding` does.
    ids: int[B, T] -> [B, T, D]"""
    xp = array_module(table)                            # a BF16Matrix widens the rows it gives
    return table[ids] * xp.asarray(cfg.embed_scale, dtype=table.dtype)


def self_attention(x, p, cfg, cos, sin, mask, cache, layer_idx, last_only=False, trace=None):
    """Causal/prefix attention with RoPE on q and k, K/V written to the cache.
    x: [B, T, D] -> [B, T, D]  (last_only: queries for the last position only -> [B, 1, D];
    keys and values, and so the cache, still cover all T positions)"""
    B, T, _ = x.shape
    Hq, Hk, E = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    if last_only:
        xq, cos_q, sin_q, mask = x[:, -1:], cos[:, :, -1:], sin[:, :, -1:], mask[..., -1:, :]
    else:
        xq, cos_q, sin_q = x, cos, sin
    q = linear(xq, p["q_proj"]["weight"]).reshape(B, -1, Hq, E).transpose(0, 2, 1, 3)  # [B, Hq, T, E]
    k = linear(x, p["k_proj"]["weight"]).reshape(B, T, Hk, E).transpose(0, 2, 1, 3)   # [B, Hk, T, E]
    v = linear(x, p["v_proj"]["weight"]).reshape(B, T, Hk, E).transpose(0, 2, 1, 3)   # [B, Hk, T, E]
    q, k = apply_rope(q, cos_q, sin_q), apply_rope(k, cos, sin)
    if cache is not None:
        k, v = cache.write(layer_idx, k, v)                                             # [B, Hk, S, E]
    out = attention(q, k, v, mask, cfg.attn_scale, cfg.attn_logit_softcapping,     # [B, T, Hq*E]
                    trace=trace, name=f"text.attn.{layer_idx:02d}")
    return linear(out, p["o_proj"]["weight"])


def geglu(x, p):
    """down(gelu_tanh(gate(x)) * up(x)).  [B, T, D] -> [B, T, F] -> [B, T, D]"""
    return linear(gelu_tanh(linear(x, p["gate_proj"]["weight"])) * linear(x, p["up_proj"]["weight"]),
                  p["down_proj"]["weight"])


def gemma_block(h, p, cfg, cos, sin, mask, cache, layer_idx, last_only=False, trace=None):
    """Gemma 1 layer: two pre-norm residual branches.
    (big_vision calls `post_attention_layernorm` `pre_ffw_norm`: it normalises the MLP input.)
    last_only: the caller needs this layer's output at the last position only (the final layer
    of a prefill that predicts one next token): K/V are computed for every position (the cache
    needs them), the rest for the last row alone -> [B, 1, D]."""
    eps = cfg.rms_norm_eps
    a = self_attention(rms_norm(h, p["input_layernorm"]["weight"], eps), p["self_attn"], cfg,
                       cos, sin, mask, cache, layer_idx, last_only, trace)
    h = (h[:, -1:] if last_only else h) + a
    return h + geglu(rms_norm(h, p["post_attention_layernorm"]["weight"], eps), p["mlp"])


def gemma2_block(h, p, cfg, cos, sin, mask, cache, layer_idx, last_only=False, trace=None):
    """Gemma 2 layer. What differs from Gemma 1: each branch output is RMS-normalised again
    before it joins the residual (`post_attention_layernorm` is a real *post* norm here, and
    `post_feedforward_layernorm` is new); the MLP input norm is `pre_feedforward_layernorm`.
    Inside attention (same function): scale query_pre_attn_scalar**-0.5, logits softcapped
    before the mask, and a sliding-window mask on the layers that slide. last_only: as in
    `gemma_block`."""
    eps = cfg.rms_norm_eps
    a = self_attention(rms_norm(h, p["input_layernorm"]["weight"], eps), p["self_attn"], cfg,
                       cos, sin, mask, cache, layer_idx, last_only, trace)
    h = (h[:, -1:] if last_only else h) + rms_norm(a, p["post_attention_layernorm"]["weight"], eps)
    m = geglu(rms_norm(h, p["pre_feedforward_layernorm"]["weight"], eps), p["mlp"])
    return h + rms_norm(m, p["post_feedforward_layernorm"]["weight"], eps)


BLOCKS = {"gemma": gemma_block, "gemma2": gemma2_block}


def lm_head(h, p, cfg):
    """Final RMSNorm, then logits against the tied embedding; Gemma 2 softcaps them
    (cap * tanh(logits / cap), as transformers 5.x does).  [..., D] -> [..., V]"""
    h = rms_norm(h, p["norm"]["weight"], cfg.rms_norm_eps)
    logits = matmul_t(h, p["embed_tokens"]["weight"])                  # h @ E^T
    if cfg.final_logit_softcapping is not None:
        logits = softcap(logits, cfg.final_logit_softcapping)
    return h, logits
