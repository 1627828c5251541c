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
# # 10 · Backpropagation: the gradient of one Gemma layer, step by step, then of the whole model
#
# **Goal.** Compute the gradient of PaliGemma's training loss by hand, one backward function at a
# time, and check every step against PyTorch autograd (the committed gradient golden,
# `tests/goldens/<model>/grads.npz`, made by `tests/make_grad_goldens.py`; no torch needed here).
#
# The loss is next-token cross-entropy on the suffix only (docs/training.md). Every forward
# function of npvlm has a backward beside it: given a dict `save`, the forward keeps what its
# backward needs; the backward takes the upstream gradient `dy` and that dict and returns the
# input gradient and the parameter gradients. For a linear layer $y = x W^\top$:
#
# $$
# \frac{\partial L}{\partial x} = \frac{\partial L}{\partial y}\, W, \qquad
# \frac{\partial L}{\partial W} = \Big(\frac{\partial L}{\partial y}\Big)^{\!\top} x ,
# $$
#
# and for Gemma's RMSNorm $y = x\, r\,(1 + w)$ with $r = 1/\sqrt{\operatorname{mean}(x^2) + \epsilon}$
# and $g = \partial L/\partial y \odot (1 + w)$:
#
# $$
# \frac{\partial L}{\partial x} = r\, g - x\, r^3 \operatorname{mean}(g \odot x), \qquad
# \frac{\partial L}{\partial w} = \sum \frac{\partial L}{\partial y} \odot x\, r .
# $$
#
# A residual block $h_{out} = h + f(h)$ passes its gradient on twice: $\partial L/\partial h =
# \partial L/\partial h_{out} + (\partial f/\partial h)^\top \partial L/\partial h_{out}$.
# Shapes: B batch, T tokens, D width, F MLP width, Hq/Hk heads, E head dim, V vocab
# (npvlm/model/layers.py).

# %%
# The golden model (a tiny PaliGemma 1 made by HF transformers, GQA 4 -> 2) and its gradient
# golden. Every check in this notebook runs without torch.
MODEL = "pg1_gqa_v5"


import matplotlib.pyplot as plt
import numpy as np

import npvlm
from npvlm.model import gemma, layers, loss, paligemma
from npvlm.model.attention import attention_backward, projections_backward
from npvlm.model.rope import apply_rope_backward
from npvlm.parity import GOLDENS, compare_grad
from npvlm.training.grads import loss_and_grads, save_plan
from npvlm.tree import flatten

plt.rcParams.update({"figure.dpi": 72})

model = npvlm.load(GOLDENS / MODEL / "model")
cfg, tc = model.cfg, model.cfg.text
with np.load(GOLDENS / MODEL / "grads.npz") as data:
    golden = {k: data[k] for k in data.files}
batch = {k[len("batch."):]: v for k, v in golden.items() if k.startswith("batch.")}
print(model)
print({k: v.shape for k, v in batch.items()})
print("labels of row 1 (left-padded; -100 = no loss):", batch["labels"][1].tolist())


def noise(name):
    return float(golden.get(f"noise.{name}", 0.0))


# %% [markdown]
# ## 1. The forward pass, keeping what the backward needs
#
# `save_plan(params, "all")` is the root `save` dict (every parameter trained); `forward_loss`
# fills it while it computes the loss: each module's dict holds what its backward reads.

# %%
saved = save_plan(model.params, "all")
L = float(paligemma.forward_loss(batch, model.params, cfg, "example", save=saved))
print(f"loss npvlm {L:.8f}   torch {float(golden['loss.example']):.8f}")

def kept(part, prefix=""):
    """{name: shape} of every array a saved dict holds, nested names joined by dots."""
    out = {}
    for k, v in part.items():
        if isinstance(v, dict):
            out.update(kept(v, f"{prefix}{k}."))
        elif hasattr(v, "shape"):
            out[prefix + k] = tuple(v.shape)
        else:
            out[prefix + k] = v
    return out


last = tc.num_hidden_layers - 1
saved_layer = saved["text"]["layers"][last]
for name, part in saved_layer.items():
    print(f"layer {last} {name:26s} keeps {kept(part)}")

# %% [markdown]
# ## 2. From the loss to the last layer's output
#
# The cross-entropy's gradient is `w_i (softmax(z_i) - onehot(target_i))` at each predicted
# position (w: the reduction's weights). Then back through the tied lm_head ($\partial L/\partial h
# = dz\,E$) and the final RMSNorm. The result is the gradient arriving at the last layer's
# output, which torch recorded as `grad.text.layer.NN`.

# %%
text = model.params["text"]
d_logits = loss.cross_entropy_backward(1.0, saved["loss"])                           # [n, V]
d_rows, g_head = gemma.lm_head_backward(d_logits, saved["text"]["lm_head"], text["embed_tokens"], tc)
dh = np.zeros(saved["inputs"]["shape"], np.float32)
dh[saved["inputs"]["rows"], saved["inputs"]["cols"]] = d_rows                   # one loss per position
real = batch["attention_mask"].astype(bool)
print(compare_grad("grad.text.final_norm", dh, golden["stage.grad.text.final_norm"],
                   noise("stage.grad.text.final_norm"), where=real))
dh, g_norm = layers.rms_norm_backward(dh, saved["text"]["norm"], **text["norm"])
name = f"grad.text.layer.{last:02d}"
print(compare_grad(name, dh, golden[f"stage.{name}"], noise(f"stage.{name}"), where=real))

# %% [markdown]
# ## 3. Back through the last Gemma layer, one function at a time
#
# The layer (notebook 05) is `h += attn(N1(h)); h += geglu(N2(h))`. Backward goes in reverse:
# the MLP branch first, then the attention branch, each adding its input gradient to the
# residual stream's.

# %%
p = text["layers"][last]
rope = saved["inputs"]["rope"]
grads = {}

# the MLP branch: down(gelu(gate x) * up x), then its input norm
dx, grads["mlp"] = gemma.geglu_backward(dh, saved_layer["mlp"], p["mlp"])
dn, grads["post_attention_layernorm"] = layers.rms_norm_backward(dx, saved_layer["post_attention_layernorm"],
                                                                 **p["post_attention_layernorm"])
dh_mid = dh + dn                                                   # the residual adds the branch's

# the attention branch, opened up: o_proj, attention (softmax, scale), RoPE, then q/k/v
sa = saved_layer["self_attn"]
d_out, g_o = layers.linear_backward(dh_mid, sa["o_proj"], **p["self_attn"]["o_proj"])
dq, dk, dv = attention_backward(d_out, sa["attn"], tc)             # [B, Hq, T, E], [B, Hk, T, E] x2
print("dq, dk, dv:", dq.shape, dk.shape, dv.shape, "(dk, dv summed over the G query heads that share each)")
dq, dk = apply_rope_backward(dq, rope), apply_rope_backward(dk, rope)
dx, g_qkv = projections_backward({"q_proj": dq, "k_proj": dk, "v_proj": dv}, sa, p["self_attn"])
grads["self_attn"] = dict(g_qkv, o_proj=g_o)
dn, grads["input_layernorm"] = layers.rms_norm_backward(dx, saved_layer["input_layernorm"], **p["input_layernorm"])
dh_in = dh_mid + dn

name = f"grad.text.layer.{last - 1:02d}"
results = [compare_grad(name, dh_in, golden[f"stage.{name}"], noise(f"stage.{name}"), where=real)]
for path, g in flatten(grads, f"text.layers.{last}.").items():
    results.append(compare_grad(path, g, golden[f"grad.{path}"], noise(path)))
for r in results:
    print(r)
assert all(r.ok for r in results)

# %% [markdown]
# The library's `gemma_layer_backward` is exactly these steps (`npvlm/model/gemma.py`):

# %%
dh_lib, grads_lib = gemma.gemma_layer_backward(dh, saved_layer, p, tc, rope)
print("same input gradient:", np.array_equal(dh_lib, dh_in),
      "| same parameter gradients:", all(np.array_equal(flatten(grads_lib)[k], v) for k, v in flatten(grads).items()))

# %% [markdown]
# ## 4. The whole model, stage by stage
#
# `loss_and_grads` runs the forward and `paligemma.backward` (every layer's backward, the merge of
# image and text embeddings, the projector, the SigLIP layers). With a `trace`, the gradient
# arriving at each stage output is kept under the forward's stage name with `grad.` in front, so
# you can step backward through the model as notebooks 02-05 stepped forward.

# %%
trace = {}
L, grads = loss_and_grads(batch, model.params, cfg, "all", "example", trace=trace)
stage_results = []
for key in sorted(k for k in golden if k.startswith("stage.")):
    stage = key[len("stage."):]
    where = real if stage.startswith("grad.text.") else None
    stage_results.append(compare_grad(stage, trace[stage], golden[key], noise(key), where=where))
    print(stage_results[-1])
flat = flatten(grads)
param_results = [compare_grad(k, flat[k], golden[f"grad.{k}"], noise(k)) for k in sorted(flat)]
print(f"{sum(r.ok for r in param_results)} / {len(param_results)} parameter gradients within tolerance")
assert all(r.ok for r in stage_results + param_results)

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
order = ([f"grad.vision.{s}" for s in ["embed"] + [f"layer.{i:02d}" for i in range(cfg.vision.num_hidden_layers)] + ["post_norm"]]
         + ["grad.projector", "grad.text.embed"] + [f"grad.text.layer.{i:02d}" for i in range(tc.num_hidden_layers)]
         + ["grad.text.final_norm"])
rms = [np.sqrt(np.mean(trace[s][..., :] ** 2)) for s in order]
axes[0].semilogy(range(len(order)), rms, "o-")
axes[0].set_xticks(range(len(order)), [s.replace("grad.", "") for s in order], rotation=75, fontsize=7)
axes[0].set_title("RMS of the gradient arriving at each stage")
rel = [r.max_abs / max(np.abs(golden[f"grad.{r.name}"]).max(), 1e-30) for r in param_results]
axes[1].hist(np.log10(np.maximum(rel, 1e-12)), bins=30)
axes[1].set_xlabel("log10 max|npvlm - torch| / max|torch| per parameter tensor")
axes[1].set_title(f"{len(rel)} parameter gradients")
plt.tight_layout()
plt.show()

# %% [markdown]
# The few tensors far to the left or right of the histogram's bulk: SigLIP's key biases, whose
# gradient is zero in exact arithmetic (softmax ignores a constant added to every score), so both
# npvlm and torch give rounding noise there; the golden's fp32-vs-fp64 noise floor covers them.
#
# ## 5. Frozen parts cost nothing
#
# Train only the decoder's attention projections (big_vision's fine-tuning choice): the frozen
# MLP projections keep nothing, the vision tower and projector keep nothing and run no backward.

# %%
def kept_bytes(tree):
    if isinstance(tree, dict):
        return sum(kept_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(kept_bytes(v) for v in tree)
    return getattr(tree, "nbytes", 0)


for train in ("all", "attention"):
    plan = save_plan(model.params, train)
    paligemma.forward_loss(batch, model.params, cfg, save=plan)
    print(f"{train:10s} keeps {kept_bytes(plan) / 1e3:8.1f} kB for backward; vision tower saved: "
          f"{plan['vision'] is not None}; layer 0's MLP keeps {kept(plan['text']['layers'][0]['mlp'])}")
_, g_attn = loss_and_grads(batch, model.params, cfg, "attention")
print(sorted(flatten(g_attn))[:4], "...", len(flatten(g_attn)), "tensors")

# %% [markdown]
# ## Exercises
#
# 1. In section 3, drop the residual's own gradient (`dh_mid = dn` instead of `dh + dn`). Predict
#    which checks fail and by how much (the attention branch's weights too?), then run the cell.
# 2. Change the loss reduction from `"example"` to `"token"` in section 4. Predict whether the
#    long or the short example's gradients grow, and check `golden["loss.token"]` against the new loss.
# 3. In section 5, train only `lambda n: n.startswith("projector.")`. Predict what the vision
#    tower keeps and which stage gradients `trace` then holds; print `plan["vision"]` and the
#    `grad.` keys to see.
