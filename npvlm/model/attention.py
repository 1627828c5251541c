"""Multi-head attention with grouped K/V heads (MHA, MQA and GQA in one function).

Axes (npvlm/model/layers.py): B batch, T queries, S keys, Hq query heads, Hk key/value heads,
G = Hq // Hk query heads per K/V head, E head dim.

    scores = (q k^T) * scale                     [B, Hq, T, S]
    scores = cap * tanh(scores / cap)            Gemma 2 only, before the mask
    probs  = softmax(scores + mask) in fp32      the mask is additive (npvlm/model/masks.py)
    out    = probs v                             [B, Hq, T, E] -> [B, T, Hq*E]

Query head j reads K/V head j // G (HF `repeat_kv` order), done by reshaping the queries into
groups, so K and V are never copied per head.
"""

from .layers import linear_backward, softcap, softcap_backward, softmax, softmax_backward


def split_heads(y, n_heads):
    """[B, T, H*E] -> [B, H, T, E]"""
    B, T, _ = y.shape
    return y.reshape(B, T, n_heads, -1).transpose(0, 2, 1, 3)


def merge_heads(y):
    """[B, H, T, E] -> [B, T, H*E] (the inverse of split_heads)"""
    B, H, T, E = y.shape
    return y.transpose(0, 2, 1, 3).reshape(B, T, H * E)


def attention(q, k, v, mask, cfg, *, save=None):
    """Scaled dot-product attention with the scale and logit cap of `cfg` (`attn_scale`,
    `attn_logit_softcapping`: SigLIP E**-0.5 and no cap; Gemma 2 query_pre_attn_scalar**-0.5, 50).

    q: [B, Hq, T, E], k, v: [B, Hk, S, E], mask: additive [B, 1, T, S] or None -> [B, T, Hq*E].
    save: keeps q, k, v and the probabilities `probs` [B, Hq, T, S] (HF's eager `attn_weights`,
    head order included; the traced attention maps are these), and the capped scores."""
    B, Hq, T, E = q.shape
    Hk, S = k.shape[1], k.shape[2]
    G = Hq // Hk
    qg = q.reshape(B, Hk, G * T, E)                                   # [B, Hk, G*T, E]
    scores = qg @ k.swapaxes(-1, -2)                                  # [B, Hk, G*T, S]
    scores *= cfg.attn_scale          # in place, as the mask below: each new [.., T, S] array costs
    if cfg.attn_logit_softcapping is not None:
        scores = softcap(scores, cfg.attn_logit_softcapping)
        if save is not None:
            save["capped"] = scores.copy()                            # before the mask goes in
    if mask is not None:
        scores = scores.reshape(B, Hk, G, T, S)
        scores += mask[:, :, None]                                    # [B, 1, 1, T, S] broadcast
    probs = softmax(scores, axis=-1).reshape(B, Hk, G * T, S)
    if save is not None:
        save.update(q=q, k=k, v=v, probs=probs.reshape(B, Hq, T, S))  # head hk*G + g, as HF's
    return merge_heads((probs @ v).reshape(B, Hq, T, E))              # [B, T, Hq*E]


def attention_backward(dy, saved, cfg):
    """The gradients of `attention` with respect to q, k, v, from what it saved (q, k, v, probs,
    the capped scores). With dO the upstream gradient as [B, Hk, G*T, E] (grouped as forward):

        dv = probs^T dO                          (sums the G query heads that share a K/V head)
        dscores = softmax_backward(dO v^T, probs) * (1 - (capped/cap)^2 if capped) * scale
        dq = dscores k,   dk = dscores^T q

    The additive mask is a constant: masked keys have probability 0 and get no gradient.
    Its three inputs get three gradients (and it has no parameters):
    dy: [B, T, Hq*E] -> dq [B, Hq, T, E], dk, dv [B, Hk, S, E]"""
    q, k, v = saved["q"], saved["k"], saved["v"]
    B, Hq, T, E = q.shape
    Hk, S = k.shape[1], k.shape[2]
    G = Hq // Hk
    probs = saved["probs"].reshape(B, Hk, G * T, S)
    d_out = split_heads(dy, Hq).reshape(B, Hk, G * T, E)
    dv = probs.swapaxes(-1, -2) @ d_out                               # [B, Hk, S, E]
    dscores = softmax_backward(d_out @ v.swapaxes(-1, -2), probs)     # [B, Hk, G*T, S]
    if "capped" in saved:
        dscores = softcap_backward(dscores, saved["capped"], cfg.attn_logit_softcapping)
    dscores = dscores * cfg.attn_scale
    dq = (dscores @ k).reshape(B, Hq, T, E)
    dk = dscores.swapaxes(-1, -2) @ q.reshape(B, Hk, G * T, E)        # [B, Hk, S, E]
    return dq, dk, dv


def projections_backward(d_heads, saved, p):
    """Back through the q/k/v projections into the input they share: d_heads maps "q_proj",
    "k_proj", "v_proj" to the gradient of their heads [B, H, T, E]. -> dx [B, T, D], grads by
    projection (the trained ones)."""
    dx, grads = 0, {}
    for name, d in d_heads.items():
        d_in, g = linear_backward(merge_heads(d), saved[name], **p[name])
        dx = dx + d_in
        if g:
            grads[name] = g
    return dx, grads
