# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 12 · Why did it say that? Attention, gradients to the pixels, the logit lens
#
# **Goal.** For every token of an answer, ask *which pixels and which image patches it depends
# on*, and *where inside the decoder it was decided*, with the model's own forward and backward
# functions, every number checked against torch (the committed explanation golden,
# `tests/goldens/<model>/explain.npz`, made by `tests/make_explain_goldens.py`).
#
# The answer $a_0 \dots a_{n-1}$ is the causal suffix after the prompt, exactly as generation
# produces it; token $a_i$ is predicted at position $p_i$ (the prompt's last position for $i=0$).
# For each token:
#
# $$
# \ell_i = \log \operatorname{softmax}(z_{p_i})[a_i], \qquad
# \text{attention}_i[l, h, j] = P_l[h, p_i, j]\ \ (j \text{ an image position}), \qquad
# g_i = \frac{\partial \ell_i}{\partial x} \in \mathbb{R}^{3 \times R \times R},
# $$
#
# where $z$ are the logits (softcapped for Gemma 2), $P_l$ layer $l$'s attention probabilities
# and $x$ the preprocessed pixels. The maps drawn from them: **gradient saliency**
# $\max_c |g_i|$ per pixel; **input × gradient** $\sum_c x_c\, g_{i,c}$, the first-order change of
# $\ell_i$ if a pixel went to $x = 0$, which is mid-grey after PaliGemma's normalisation; and the
# **logit lens** $\ell_i^{(l)} = \log\operatorname{softmax}(\operatorname{lm\_head}(\operatorname{norm}(r_l[p_i])))[a_i]$,
# the answer read from the residual stream $r_l$ after layer $l$ as if it were the last.
#
# PaliGemma's twist: its prefix (image + prompt) is attended **bidirectionally**, so the image
# tokens' states in the decoder depend on the prompt. Section 6 measures how much.

# %%
MODEL = "demo"

import matplotlib.pyplot as plt
import numpy as np

import npvlm
from npvlm.demo import SAMPLE_SCENE
from npvlm.demo.interpret import format_results, measure, prefix_change
from npvlm.demo.scenes import make_scene
from npvlm.explain import maps
from npvlm.explain.attribute import explain_tokens, frozen_plan
from npvlm.inputs.image import load_image
from npvlm.model import paligemma
from npvlm.model.gemma import lm_head, lm_head_backward
from npvlm.model.layers import rms_norm_backward
from npvlm.parity import GOLDENS, compare, compare_grad

plt.rcParams.update({"figure.dpi": 72})
model = npvlm.load(MODEL)
cfg = model.cfg
print(model)

# %% [markdown]
# ## 1. Explain an answer
#
# `model.explain(image, prompt)` answers greedily and explains every token of its answer
# (`answer="..."` explains a given answer instead, its tokens forced: why did the model *not* say
# something?). The shapes: n answer tokens, L decoder layers, Hq query heads, N image tokens.

# %%
prompt = "answer en what color is the circle?"
exp = model.explain(SAMPLE_SCENE, prompt)
print("answer:", exp.text)
for t, text, lp in zip(exp.tokens, exp.token_texts, exp.logprobs):
    print(f"  token {t:5d} {text!r:10} p = {np.exp(lp):.4f}")
print("image_attention", exp.image_attention.shape, " pixel_grads", exp.pixel_grads.shape,
      " logit_lens", exp.logit_lens.shape)

other = model.explain(SAMPLE_SCENE, prompt, answer="red")
print(f"\nforced answer 'red': p = {np.exp(other.logprobs[0]):.2e} (the model's own: {np.exp(exp.logprobs[0]):.4f})")

# %% [markdown]
# ## 2. Where does it look when it says *yellow*?
#
# The three maps for the first answer token, on the image the vision tower saw (64 × 64 for the
# demo, 8 × 8 patches of 8 px). Gradient and attention are ≥ 0; input × gradient is signed (red:
# these pixels support the token, blue: they oppose it).

# %%
view = exp.pixel_values.transpose(1, 2, 0) * 0.5 + 0.5
R = view.shape[0]
fig, axes = plt.subplots(1, 4, figsize=(13, 3.4))
axes[0].imshow(view)
axes[0].set_title("the model's view")
for ax, kind in zip(axes[1:], ("gradient", "input_x_gradient", "attention")):
    m = maps.patch_map(exp, 0, kind)
    ax.imshow(view)
    signed = kind == "input_x_gradient"
    top = np.abs(m).max()
    ax.imshow(m, cmap="RdBu_r" if signed else "inferno", alpha=0.7, extent=(0, R, R, 0),
              vmin=-top if signed else 0, vmax=top)
    ax.set_title(f"{kind} for {exp.token_texts[0]!r}")
for ax in axes:
    ax.axis("off")
plt.show()

# attention by layer: which layers look at the circle?
fig, axes = plt.subplots(1, cfg.text.num_hidden_layers, figsize=(13, 3.2))
for l, ax in enumerate(axes):
    ax.imshow(view)
    ax.imshow(maps.patch_map(exp, 0, "attention", layers=[l]), cmap="inferno", alpha=0.7, extent=(0, R, R, 0))
    ax.set_title(f"layer {l}: {exp.image_attention[0, l].sum(-1).mean():.2f} on the image")
    ax.axis("off")
plt.show()

# %% [markdown]
# ## 3. Stepping backward from one answer token to the pixels
#
# `explain_tokens` runs the training pass's backward functions under a save plan in which every
# module is frozen (`frozen_plan`): no weight gradient, and each module keeps only what its input
# gradient needs. Here the same steps by hand for the forced answer "red" (p = 2e-6: a gradient
# far from saturation; for "yellow", p rounds to 1 and $1 - p$ must be summed from the other
# tokens' probabilities, which `explain_tokens` does), with a trace of the gradient arriving at
# every stage, from the last decoder layer back to the patch embedding.

# %%
inputs = model.processor([load_image(SAMPLE_SCENE)], [prompt])
T0 = inputs["input_ids"].shape[1]
ids = np.concatenate([inputs["input_ids"], [other.tokens]], axis=1)
seq = {"input_ids": ids, "attention_mask": np.ones_like(ids),
       "token_type_ids": np.concatenate([np.zeros((1, T0), np.int64), np.ones((1, len(other.tokens)), np.int64)], 1)}
save, params, text = frozen_plan(model.params), model.params, model.params["text"]
st = save["text"]
image_tokens = paligemma.encode_images(inputs["pixel_values"], params, cfg, save=save)
h, rope, masks = paligemma.decoder_inputs(seq, image_tokens, params, cfg, save=st.setdefault("embed_tokens", {}))
h = paligemma.decoder(h, text["layers"], cfg.text, rope, masks, save=st)
normed = paligemma.final_norm(h, text["norm"], cfg.text, save=st.setdefault("norm", {}))
z = lm_head(normed[0, [T0 - 1]], text["embed_tokens"], cfg.text, save=st.setdefault("lm_head", {}))
probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
d_z = -probs
d_z[0, other.tokens[0]] += 1                                 # d log p / d z = onehot - softmax
d_row, _ = lm_head_backward(d_z, st["lm_head"], text["embed_tokens"], cfg.text)
dh = np.zeros(h.shape, np.float32)
dh[0, T0 - 1] = d_row[0]
trace = {}
dh, _ = rms_norm_backward(dh, st["norm"], **text["norm"])
dh, _ = paligemma.decoder_backward(dh, st, text["layers"], cfg.text, rope, trace=trace)
d_image, _ = paligemma.merge_embeddings_backward(dh, st["embed_tokens"], text["embed_tokens"], cfg)
d_pixels, _ = paligemma.encode_images_backward(d_image, save, params, cfg, need_dx=True, trace=trace)
print(compare_grad("pixel gradient, by hand vs explain", d_pixels[0], other.pixel_grads[0]))
names = [k for k in trace if k.startswith("grad.")][::-1]
norms = [np.linalg.norm(trace[k]) for k in names]
plt.figure(figsize=(10, 3))
plt.semilogy(norms, "o-")
plt.xticks(range(len(names)), [n[5:] for n in names], rotation=60, fontsize=8)
plt.ylabel("|gradient| arriving")
plt.title("the gradient of log p('red'), stage by stage, from the decoder back to the patches")
plt.show()

# %% [markdown]
# ## 4. The logit lens: where in the decoder was the answer decided?
#
# Each residual stream $r_l$ read through the final norm and the tied lm_head. The rank of the
# answer token (0: the model's top choice) and its probability, layer by layer; the last row is
# the model's own output.

# %%
for i, text_i in enumerate(exp.token_texts):
    print(f"token {i} {text_i!r}")
    for l in range(cfg.text.num_hidden_layers + 1):
        name = "embeddings" if l == 0 else f"layer {l - 1}"
        top = ", ".join(repr(model.processor.tokenizer.decode([t]) or model.processor.tokenizer.piece(int(t)))
                        for t in exp.lens_top_ids[i, l, :3])
        print(f"  {name:10s} rank {exp.lens_rank[i, l]:4d}  p {np.exp(exp.logit_lens[i, l]):.4f}   top: {top}")

# %% [markdown]
# ## 5. Do the maps mean anything? The deletion test
#
# Grey out the top 5 / 10 / 25% of patches by each map and score the answer again with its tokens
# forced: a map that found what the answer depends on makes log p(answer) drop more than random
# patches do. "Pointing": how often the map's top patch lies on the object the question is
# about. Here on 20 held-out scenes (a few seconds); docs/interpretability.md has the table for
# 200 (`python -m npvlm.demo.interpret`).

# %%
results = measure(model, n_scenes=20)
print(format_results(results, "demo: 20 held-out scenes"))

# %% [markdown]
# ## 6. The prefix effect
#
# Under the prefix-LM mask the image tokens attend to the prompt too, so their states in the
# decoder change with the question. The relative change of the image positions' residual
# stream between "caption en" and a color question, per layer (exactly 0 at the embeddings; in a
# causal model with the image first, such as LLaVA, it would be 0 everywhere).

# %%
changes = np.array([prefix_change(model, make_scene(np.random.default_rng([5, i]), size=128)) for i in range(20)])
plt.figure(figsize=(6, 3))
plt.plot(changes.mean(0), "o-")
plt.xticks(range(changes.shape[1]), ["embed"] + [f"layer {l}" for l in range(changes.shape[1] - 1)])
plt.ylabel("||h_a - h_b|| / ||h_a||")
plt.title("image tokens' states, two prompts, same image")
plt.show()
print(np.round(changes.mean(0), 3))

# %% [markdown]
# ## 7. The check: equal to torch, no torch needed
#
# The golden holds transformers' eager attention weights, torch autograd's pixel gradients and the
# lens read from HF's decoder-layer outputs for a fixed prompt and answer on a tiny PaliGemma.

# %%
name = "pg2_gqa_v5"
golden_model = npvlm.load(GOLDENS / name / "model")
with np.load(GOLDENS / name / "explain.npz") as data:
    ref = {k: data[k] for k in data.files}
prompt_ids = ref["batch.input_ids"]
g = explain_tokens({"input_ids": prompt_ids, "attention_mask": np.ones_like(prompt_ids),
                    "pixel_values": ref["batch.pixel_values"]}, ref["tokens"].tolist(),
                   golden_model.params, golden_model.cfg)
for key in ("logprobs", "image_attention", "logit_lens"):
    print(compare(key, getattr(g, key), ref[key]))
for i in range(len(g.tokens)):
    print(compare_grad(f"pixel_grads[{i}]", g.pixel_grads[i], ref["pixel_grads"][i], ref["noise.pixel_grads"][i]))

# %% [markdown]
# ## Exercises
#
# 1. In section 1, explain `answer="blue"` and `answer="green"`. Predict which has the lower
#    probability and where its input × gradient map turns blue (pixels that argue against it).
# 2. In section 3, start the backward from the *second* answer token (`<eos>`): predict whether
#    its pixel gradient is larger or smaller than the color word's, then compare the norms.
# 3. In section 5, add a map kind "attention, first layer" to `npvlm.demo.interpret.answer_maps`
#    and predict whether it points at the object more or less often than the last layer does.
