"""Why each answer token: its log-probability, the attention of its query over the image, its
gradient with respect to the pixels, and the logit lens, from one forward pass and one backward
pass per token, with the model math's own functions (npvlm/model).

Axes (npvlm/model/layers.py): n answer tokens, L decoder layers, Hq query heads, N image tokens,
C channels, R image side, T sequence (prompt + answer), D text width, V vocab, k top tokens.

The answer is the causal suffix of one sequence, exactly as in generation and in training:

    ids = <image>*N <bos> prompt "\\n" | a_0 a_1 ... a_{n-1}          (token type 0 | 1)
    token a_i is predicted at position p_i = T0 - 1 + i (T0 = the prompt's length)

so one pass with the prefix-LM mask gives every p_i's logits as generation computes them
(greedy tokens are the arg-maxes). For each answer token i:

    logprob[i]            log softmax(z_{p_i})[a_i]                 z: the logits (Gemma 2 softcapped)
    image_attention[i]    probs_l[h, p_i, image positions]          every layer l, query head h
    pixel_grads[i]        d logprob[i] / d pixel_values             back through the decoder, the
                                                                    projector and SigLIP, nothing trained
    logit_lens[i, l]      log softmax(lm_head(final_norm(r_l[p_i])))[a_i]
                          r_0: the scaled embeddings entering layer 0; r_l: layer l's output;
                          r_L gives logprob[i] itself

The backward starts at the final norm's output: d logprob / d z = onehot(a_i) - softmax(z), then
`lm_head_backward`, `rms_norm_backward`, `decoder_backward`, `merge_embeddings_backward` and
`encode_images_backward(need_dx=True)`, the training pass's functions under a save plan in which
every module is frozen: no weight gradient is computed, and each module keeps only what its
input gradient needs (a frozen linear layer keeps nothing).
"""

from dataclasses import dataclass, field

import numpy as np

from ..backend import array_module, to_host
from ..errors import InputError
from ..inputs.image import load_image
from ..model.gemma import lm_head, lm_head_backward
from ..model.layers import rms_norm_backward
from ..model.paligemma import (
    decoder,
    decoder_backward,
    decoder_inputs,
    encode_images,
    encode_images_backward,
    final_norm,
    image_positions,
    merge_embeddings_backward,
)
from ..model.record import attention_probs, sub
from ..tree import flatten, unflatten


@dataclass
class Explanation:
    """What `explain_tokens` computes for n answer tokens (host float32 / int arrays); the API
    (`PaliGemma.explain`) adds the text. Fields as in the module docstring:

    tokens           int list [n]              the answer's ids (its <eos> included when it has one)
    positions        int list [n]              p_i, where token i is predicted
    logprobs         float32 [n]
    image_attention  float32 [n, L, Hq, N]
    pixel_grads      float32 [n, C, R, R]
    logit_lens       float32 [n, L + 1]
    lens_top_ids     int64 [n, L + 1, k]       the k most likely tokens read at each layer
    lens_top_logprobs float32 [n, L + 1, k]
    lens_rank        int64 [n, L + 1]          token i's rank at each layer (0: the top)
    pixel_values     float32 [C, R, R]         the preprocessed image the vision tower saw
    """
    tokens: list
    positions: list
    logprobs: np.ndarray
    image_attention: np.ndarray
    pixel_grads: np.ndarray
    logit_lens: np.ndarray
    lens_top_ids: np.ndarray
    lens_top_logprobs: np.ndarray
    lens_rank: np.ndarray
    pixel_values: np.ndarray
    text: str = ""
    token_texts: list = field(default_factory=list)
    prompt: str = ""
    image_size: tuple = None


def frozen_plan(params):
    """The save plan of a pass that differentiates with respect to the input alone: every
    module {"frozen": True} (npvlm/model/record.py), the vision tower and projector included, so
    the backward runs through them to the pixels without computing any weight gradient."""
    modules = {name.rpartition(".")[0] for name in flatten(params)}
    plan = unflatten({module: {"frozen": True} for module in modules})
    plan["text"]["lm_head"] = {"frozen": True}
    return plan


def log_softmax(z):
    """log softmax over the last axis in fp32 (fp64 stays fp64). [..., V] -> [..., V]"""
    xp = array_module(z)
    z = z.astype(xp.float64 if z.dtype == xp.float64 else xp.float32, copy=False)
    m = z.max(axis=-1, keepdims=True)
    return z - (xp.log(xp.exp(z - m).sum(axis=-1, keepdims=True)) + m)


def explain_tokens(batch, tokens, params, cfg, top_k=5):
    """Explain `tokens` (host ints, n >= 1) as the answer to a one-row prompt batch: input_ids and
    attention_mask int[1, T0] (no padding) and pixel_values float32[1, C, R, R], on the params'
    backend. -> Explanation."""
    input_ids, pixels = batch["input_ids"], batch["pixel_values"]
    xp = array_module(input_ids)
    n, T0 = len(tokens), input_ids.shape[1]
    answer = xp.asarray(np.asarray(tokens, np.int64)[None], dtype=input_ids.dtype)
    ids = xp.concatenate([input_ids, answer], axis=1)                                  # [1, T]
    seq = {"input_ids": ids, "attention_mask": xp.ones_like(ids),
           "token_type_ids": xp.concatenate([xp.zeros_like(input_ids), xp.ones_like(answer)], axis=1)}
    positions = list(range(T0 - 1, T0 - 1 + n))                                        # p_i
    rows = xp.asarray(positions)

    # forward: one pass, keeping what the input gradient needs. That is all the rest needs too:
    # each layer's attention probabilities, and the residual stream as the RMSNorms' saved
    # inputs (layer l's input norm keeps r_l, the final norm keeps r_L)
    save = frozen_plan(params)
    text, st = params["text"], save["text"]
    image_tokens = encode_images(pixels, params, cfg, save=save)
    h, rope, masks = decoder_inputs(seq, image_tokens, params, cfg, save=sub(st, "embed_tokens"))
    h = decoder(h, text["layers"], cfg.text, rope, masks, save=st)
    normed = final_norm(h, text["norm"], cfg.text, save=sub(st, "norm"))
    logits = lm_head(normed[0, rows], text["embed_tokens"], cfg.text, save=sub(st, "lm_head"))   # [n, V]
    logp = log_softmax(logits.astype(xp.float64))             # fp64: a confident token's log p is ~ -1e-7
    target = xp.asarray(np.asarray(tokens, np.int64))
    logprobs = logp[xp.arange(n), target]

    # backward, one answer token at a time: d logprob_i / d logits_i = onehot - softmax, with
    # 1 - p(token) summed from the other tokens' probabilities (1 - p loses every digit in fp32
    # when p rounds to 1)
    d_logits = -xp.exp(logp)
    d_logits[xp.arange(n), target] = 0.0
    d_logits[xp.arange(n), target] = -d_logits.sum(axis=-1)
    d_rows, _ = lm_head_backward(d_logits.astype(logits.dtype), st["lm_head"], text["embed_tokens"],
                                 cfg.text)                                             # [n, D]: row i for token i
    grads = []
    for i in range(n):
        dh = xp.zeros(h.shape, dtype=d_rows.dtype)
        dh[0, positions[i]] = d_rows[i]
        dh, _ = rms_norm_backward(dh, st["norm"], **text["norm"])
        dh, _ = decoder_backward(dh, st, text["layers"], cfg.text, rope)
        d_image, _ = merge_embeddings_backward(dh, st["embed_tokens"], text["embed_tokens"], cfg)
        d_pixels, _ = encode_images_backward(d_image, save, params, cfg, need_dx=True)
        grads.append(to_host(d_pixels[0]))

    image = xp.asarray(np.flatnonzero(to_host(image_positions(input_ids[0], cfg))))   # the N image positions
    layers = st["layers"]
    attention = np.stack([to_host(attention_probs(s)[0][:, rows][:, :, image]).transpose(1, 0, 2)
                          for s in layers], axis=1)                                   # [Hq, n, N] -> [n, L, Hq, N]
    stream = [s["input_layernorm"]["x"][0, rows] for s in layers] + [st["norm"]["x"][0, rows]]   # r_0..r_L
    lens, top_ids, top_logp, rank = logit_lens(stream, tokens, text, cfg, top_k)
    return Explanation(
        tokens=[int(t) for t in tokens], positions=positions,
        logprobs=np.asarray(to_host(logprobs), np.float32), image_attention=attention.astype(np.float32),
        pixel_grads=np.stack(grads).astype(np.float32), logit_lens=lens, lens_top_ids=top_ids,
        lens_top_logprobs=top_logp, lens_rank=rank, pixel_values=np.asarray(to_host(pixels[0]), np.float32))


def logit_lens(stream, tokens, text, cfg, top_k):
    """Read the residual stream r_0..r_L at the answer positions (L + 1 arrays [n, D]: the scaled
    embeddings entering layer 0, then each layer's output) through the final norm and the tied
    lm_head (softcapped for Gemma 2), log-softmax in fp64: -> (log p(token_i) [n, L + 1], the
    top-k ids and their log-probabilities [n, L + 1, k], token i's rank [n, L + 1])."""
    xp = array_module(text["norm"]["weight"])
    target = xp.asarray(np.asarray(tokens, np.int64))[:, None]
    mine, top_ids, top_logp, rank = [], [], [], []
    for r in stream:                                                                   # one at a time: [n, V]
        z = lm_head(final_norm(r, text["norm"], cfg.text), text["embed_tokens"], cfg.text)
        logp = log_softmax(z.astype(xp.float64))
        own = xp.take_along_axis(logp, target, axis=-1)                                # [n, 1]
        k = min(top_k, logp.shape[-1])
        top = xp.argpartition(-logp, k - 1, axis=-1)[:, :k]
        top = xp.take_along_axis(top, xp.argsort(-xp.take_along_axis(logp, top, axis=-1), axis=-1), axis=-1)
        mine.append(to_host(own[:, 0]))
        rank.append(to_host((logp > own).sum(axis=-1)))
        top_ids.append(to_host(top))
        top_logp.append(to_host(xp.take_along_axis(logp, top, axis=-1)))
    return (_by_layer(mine, np.float32), _by_layer(top_ids, np.int64), _by_layer(top_logp, np.float32),
            _by_layer(rank, np.int64))


def _by_layer(parts, dtype):
    """L + 1 host arrays [n, ...] -> [n, L + 1, ...]"""
    return np.stack([np.asarray(p) for p in parts], axis=1).astype(dtype)


# ---- from an image and a prompt (PaliGemma.explain) -------------------------------------------

def explain(model, image, prompt, max_new_tokens=32, answer=None, top_k=5):
    """`PaliGemma.explain`: explain the model's greedy answer to `prompt` about `image` (one image:
    a path, URL, PIL image or array), or a given `answer`, so a user can ask why the model did
    not say something: a string (tokenized as a training suffix, <eos> appended) or a list of
    token ids (used as they are, e.g. a sampled answer's). -> Explanation"""
    if isinstance(image, (list, tuple)) or not isinstance(prompt, str):
        raise InputError("explain takes one image and one prompt string (a batch of one)")
    ids_given = isinstance(answer, (list, tuple, np.ndarray)) and len(answer) > 0 and all(
        isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in answer)
    if answer is not None and not ids_given and (not isinstance(answer, str) or not answer):
        raise InputError("answer must be a non-empty string or list of token ids (or None: the model's "
                         f"own answer), got {answer!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise InputError(f"top_k must be an integer >= 1, got {top_k!r}")
    image = load_image(image)
    processor = model.processor
    if answer is None or ids_given:
        tokens = ([int(t) for t in answer] if ids_given
                  else model.generate(image, prompt, max_new_tokens=max_new_tokens).tokens)
        inputs = processor([image], [prompt])
        vocab = model.cfg.text.vocab_size
        if any(not 0 <= t < vocab for t in tokens):
            raise InputError(f"answer token ids must lie in [0, {vocab}), got {tokens}")
    else:
        inputs = processor([image], [prompt], [answer])
        suffix = inputs["token_type_ids"][0] == 1
        tokens = inputs["input_ids"][0, suffix].tolist()
        inputs = {k: v[:, ~suffix] if k != "pixel_values" else v for k, v in inputs.items() if k != "labels"}
    if model.cfg.image_token_index in tokens:
        raise InputError(f"the answer holds the <image> token (id {model.cfg.image_token_index}), which only the "
                         "prompt's image positions may; explain another answer")
    T = inputs["input_ids"].shape[1] + len(tokens)
    if T > model.cfg.text.max_position_embeddings:
        raise InputError(f"prompt and answer are {T} tokens, more than the model's "
                         f"{model.cfg.text.max_position_embeddings} positions; shorten them")
    batch = model.device_batch({k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values")})
    exp = explain_tokens(batch, tokens, model.params, model.cfg, top_k)
    tokenizer = processor.tokenizer
    exp.text = tokenizer.decode(tokens)
    exp.token_texts = [tokenizer.decode([t]) or tokenizer.piece(t) or "" for t in tokens]
    exp.prompt, exp.image_size = prompt, image.size
    return exp
