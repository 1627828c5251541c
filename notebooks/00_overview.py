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
# # 00 · Overview: from an image file to an answer
#
# **Goal.** Run the whole of PaliGemma once, stage by stage, on a demo scene: read the file,
# preprocess it, turn it into image tokens, read the prompt, and write the answer token by token.
# Each later notebook opens one of these stages.
#
# PaliGemma is a SigLIP vision encoder, one linear projector and a Gemma decoder. The decoder
# reads the image tokens, then `<bos>`, the prompt and `"\n"`, and predicts the answer one token
# at a time:
#
# $$
# p(y_t \mid y_{<t}, x, \text{prompt}) =
# \operatorname{softmax}\Big(\operatorname{Gemma}\big[\,W\,\operatorname{SigLIP}(x) + b;\;
# \sqrt{D}\,E_{\text{prompt}};\; \sqrt{D}\,E_{y_{<t}}\big]_{\text{last}}\; E^{\top}\Big)
# $$
#
# with $E$ the token embedding table (shared with the output layer) and $D$ the decoder width.
#
# Shapes use the axis legend of `npvlm/model/layers.py`: B batch, T tokens, R image side in pixels,
# N image tokens, D width, V vocabulary.
#
# | stage | npvlm | notebook |
# |---|---|---|
# | file → RGB image → `pixel_values [B, 3, R, R]` | `npvlm.inputs.image` | 01 |
# | patches → `[B, N, D_v]` | `siglip.patch_embed` | 02 |
# | SigLIP encoder layers | `siglip.encoder_layer` | 03 |
# | projector, merge with the text embeddings | `paligemma.encode_images`, `merge_embeddings` | 04 |
# | Gemma layers | `gemma.gemma_layer` | 05 |
# | prefix-LM mask, prefill, KV cache, decode | `masks.prefix_lm_mask`, `paligemma.prefill`, `decode_step` | 06 |
# | choosing the next token | `sampling.choose` | 07 |
# | `<loc>`/`<seg>` tokens → boxes and masks | `detection`, `segmentation`, `draw` | 08 |
# | PaliGemma 2 | `gemma.gemma2_layer` | 09 |
# | the backward pass, every gradient | `paligemma.backward`, each layer's `_backward` | 10 |
# | fine-tuning: loss, optimizer, steps | `training.grads.loss_and_grads`, `training.optim` | 11 |
#
# `siglip`, `gemma`, `paligemma`, `masks` and the other modules of the model math live in
# `npvlm/model/` and need numpy alone; around them, `npvlm/inputs/` (images, tokens),
# `npvlm/generation/` (the decode loop, `sampling`), `npvlm/tasks/` (`detection`,
# `segmentation`, `draw`) and `npvlm/training/`. docs/architecture.md opens with the map.

# %%
# The model these notebooks run on. "demo" is the small PaliGemma embedded in npvlm
# (npvlm/demo/model, trained on the synthetic shape scenes of npvlm.demo.scenes). Set MODEL to a real
# checkpoint folder instead, e.g. a downloaded google/paligemma-3b-mix-224 (docs/checkpoints.md),
# and the notebook runs unchanged on it: every size below is read from model.cfg. (A 3B model in
# fp32 needs ~12 GB of memory and runs much slower on a CPU.)
MODEL = "demo"

import time

import matplotlib.pyplot as plt
import numpy as np

import npvlm
from npvlm.parity import GOLDENS, compare_stages

plt.rcParams.update({"figure.dpi": 72, "image.interpolation": "nearest"})

t0 = time.perf_counter()
model = npvlm.load(MODEL)
cfg = model.cfg
print(f"loaded in {time.perf_counter() - t0:.2f} s: {model}")
v, t = cfg.vision, cfg.text
print(f"SigLIP: image {v.image_size}px, patch {v.patch_size}px -> N = {cfg.num_image_tokens} tokens, "
      f"{v.num_hidden_layers} layers x width {v.hidden_size}, {v.num_attention_heads} heads")
print(f"Gemma:  {t.num_hidden_layers} layers x width D = {t.hidden_size}, {t.num_attention_heads} query heads, "
      f"{t.num_key_value_heads} K/V head(s), head dim {t.head_dim}, vocab V = {t.vocab_size}")

# %% [markdown]
# ## 1. The file
#
# `npvlm/demo/samples/scene.png` is a scene of the demo world (`npvlm.demo.scenes.make_scene(npvlm.demo.SAMPLE_SEED)`): 1–3
# colored shapes on a light background. `load_image` reads any file Pillow reads (or a PIL image,
# or an array) into an upright RGB image.

# %%
from npvlm.demo import SAMPLE_SCENE, SAMPLE_SEED
from npvlm.demo.scenes import make_scene, tasks
from npvlm.inputs.image import load_image

image = load_image(SAMPLE_SCENE)
print(f"{SAMPLE_SCENE.name}: {image.size[0]}x{image.size[1]} {image.mode}")
truth = dict(tasks(make_scene(SAMPLE_SEED)))          # what the demo world says the answers are
for prompt, answer in truth.items():
    print(f"  {prompt!r:<42} -> {answer!r}")

fig, ax = plt.subplots(figsize=(3, 3))
ax.imshow(image)
ax.set_title(SAMPLE_SCENE.name)
ax.axis("off")
plt.show()

# %% [markdown]
# ## 2. Preprocessing and the prompt
#
# The processor resizes the image to `R x R` and maps it to `[-1, 1]` (notebook 01), and builds
# the token sequence `<image> x N, <bos>, prompt, "\n"`. The `<image>` ids are placeholders: the
# image tokens will be written over them (notebook 04).

# %%
PROMPT = "caption en"
timings = {}

t0 = time.perf_counter()
inputs = model.processor([image], [PROMPT])
timings["preprocess"] = time.perf_counter() - t0
for name, a in inputs.items():
    print(f"{name:<15} {str(a.dtype):<8} {list(a.shape)}")

tok = model.tokenizer
N = cfg.num_image_tokens


def piece(i):
    """The vocabulary entry of an id ('▁' marks a leading space); embedding rows past the vocabulary have none."""
    return tok.piece(i) or f"<row {i}>"


ids = inputs["input_ids"][0]
print(f"\ninput_ids: {N} x <image>, then {[piece(i) for i in ids[N:]]}")

# %% [markdown]
# ## 3. Image tokens: SigLIP + projector
#
# `encode_images` runs the vision tower on the pixels and projects every patch feature to the
# decoder width: `[B, 3, R, R] -> [B, N, D]`.

# %%
t0 = time.perf_counter()
image_tokens = model.encode_images(inputs["pixel_values"])
timings["image encode"] = time.perf_counter() - t0
print(f"pixel_values {list(inputs['pixel_values'].shape)} -> image_tokens {list(image_tokens.shape)}")

# %% [markdown]
# ## 4. Prefill
#
# One pass of the decoder over the whole prompt (image tokens + text) fills the KV cache and
# gives the logits of the first answer token, at the last prompt position only.

# %%
MAX_NEW = 24
B, T = inputs["input_ids"].shape
cache = model.new_cache(B, T + MAX_NEW)                  # room for the prompt and the answer
t0 = time.perf_counter()
logits = model.prefill(inputs["input_ids"], inputs["attention_mask"], image_tokens=image_tokens,
                       cache=cache)
timings["prefill"] = time.perf_counter() - t0
print(f"prefill: {T} tokens -> logits {list(logits.shape)}; the cache now holds {cache.length} tokens")

probs = np.exp(logits[0] - logits[0].max())
probs /= probs.sum()
print("most likely first tokens:", ", ".join(f"{piece(i)!r} {probs[i]:.3f}" for i in np.argsort(-probs)[:5]))

# %% [markdown]
# ## 5. Decode, one token at a time
#
# Greedy decoding: take the most likely token, feed it back as a one-token step against the
# cache, and repeat until `<eos>` or the length limit.

# %%
new_ids = []
t0 = time.perf_counter()
token = int(logits.argmax(-1)[0])
while True:
    new_ids.append(token)
    if token == cfg.eos_token_id or len(new_ids) == MAX_NEW:
        break
    logits = model.decode_step(np.array([token]), cache)          # [1] -> [1, V]
    token = int(logits.argmax(-1)[0])
timings["decode"] = time.perf_counter() - t0
answer = tok.decode(new_ids)
print(f"{len(new_ids)} tokens: {[piece(i) for i in new_ids]}")
print(f"answer: {answer!r}   (the demo world says {truth[PROMPT]!r})")

# %% [markdown]
# `model.generate` is exactly this loop (plus batching, sampling, stop strings and streaming):

# %%
out = model.generate(SAMPLE_SCENE, PROMPT, max_new_tokens=MAX_NEW)
print(f"{out.text!r} (finish: {out.finish_reason})")
assert out.tokens == new_ids

# %% [markdown]
# ## Where the time goes
#
# Image encoding and prefill are big matrix products over all tokens at once; decoding is one
# small matrix-vector pass per token. On the small demo model everything takes milliseconds; on a
# 3B checkpoint prefill dominates short answers and each decode step reads every weight once.

# %%
per_token = timings["decode"] / max(len(new_ids) - 1, 1)
for stage, s in timings.items():
    print(f"{stage:<13} {1000 * s:8.1f} ms")
print(f"decode        {1000 * per_token:8.1f} ms per token ({1 / per_token:.0f} tokens/s)")

fig, ax = plt.subplots(figsize=(6, 2))
ax.barh(list(timings)[::-1], [1000 * s for s in timings.values()][::-1], color="tab:blue")
ax.set_xlabel("ms")
ax.set_title(f"{PROMPT!r}: {len(new_ids)} new tokens")
plt.show()

# %% [markdown]
# ## The four kinds of question
#
# The demo world asks for a caption, a color, a count, or boxes (`detect`). A detection answer
# is a string of `<locNNNN>` tokens; `Generation.detections()` turns it into boxes in the image's
# pixels (notebook 08).

# %%
from npvlm.tasks.draw import draw_objects

prompts = ["caption en", "answer en what color is the circle?", "answer en how many shapes are there?",
           "detect circle"]
for prompt in prompts:
    out = model.generate(SAMPLE_SCENE, prompt, max_new_tokens=32)
    ms = 1000 * (out.timings["time_to_first_token_s"] + out.timings["decode_s"])
    print(f"{prompt!r:<40} -> {out.text!r:<44} ({len(out.tokens)} tokens, {ms:.0f} ms; "
          f"expected {truth[prompt]!r})")

found = out.detections()
print(f"\n{len(found.objects)} box(es), {len(found.problems)} malformed record(s)")
drawn = draw_objects(image, found.objects)       # a PIL image, upscaled so the labels are readable
w, h = drawn.size
fig = plt.figure(figsize=(w / 72, h / 72 + 0.4))  # one figure pixel per image pixel: no resampling blurs the labels
ax = fig.add_axes((0, 0, 1, h / (h + 0.4 * 72)))
ax.imshow(drawn)
ax.set_title(f"{prompts[-1]!r} ({w}x{h} px)")
ax.axis("off")
plt.show()

# %% [markdown]
# ## Check: the same pipeline against Hugging Face
#
# `tests/goldens/` holds tiny random-weight PaliGemma checkpoints with every intermediate
# tensor and the greedy tokens that HF transformers computed for them (`tests/make_goldens.py`).
# Run the pipeline above on one of them and compare every stage with `npvlm.parity.compare_stages`,
# the helper the tests use, over the stage list `npvlm.model.record.stage_names` (the same list the tests
# and goldens use). Text stages are compared on real tokens only (left padding is masked
# garbage). The goldens are committed files: this check needs neither torch nor transformers.

# %%
from npvlm.generation.generate import greedy_ids
from npvlm.model.record import stage_names

golden = dict(np.load(GOLDENS / "pg1_mqa_hub" / "goldens.npz"))
gmodel = npvlm.load(GOLDENS / "pg1_mqa_hub" / "model")
trace = {}
inputs_of = ("input_ids", "attention_mask", "token_type_ids", "pixel_values")      # the processor's keys
gmodel.prefill({k: golden[k] for k in inputs_of}, logits_for="all", trace=trace)
real = golden["attention_mask"].astype(bool)
names = stage_names(gmodel.cfg.vision.num_hidden_layers, gmodel.cfg.text.num_hidden_layers)
results = compare_stages(trace, golden, names,
                         where=lambda n: real if n.startswith(("text.", "logits")) else None)
tokens = greedy_ids(gmodel, golden["input_ids"], golden["attention_mask"], golden["pixel_values"],
                    max_new_tokens=golden["greedy_tokens"].shape[1])
print("greedy tokens equal HF's:", np.array_equal(tokens, golden["greedy_tokens"]))
assert all(r.ok for r in results) and np.array_equal(tokens, golden["greedy_tokens"])

# %% [markdown]
# ## Exercises
#
# 1. In the cell of section 4, set `MAX_NEW = 3` and rerun it and the decode cell. Predict how
#    many tokens the answer has, its `finish_reason` in the `model.generate` cell, and whether
#    `assert out.tokens == new_ids` still holds. The printed token list and `(finish: ...)` show it.
# 2. Change `PROMPT` in section 2 to `"answer en how many shapes are there?"` and rerun down to
#    the timings. Predict which bar grows and which shrinks compared with the caption (prompt
#    length feeds prefill, answer length feeds decode); the bar chart and the printed ms show it.
# 3. In the last section, replace `"detect circle"` with `"detect circle ; square"` (two classes
#    in one prompt). Predict how many boxes come back, their labels and colors, and how many
#    tokens the answer takes (four `<loc>` tokens and a label per object, `;` between records);
#    the printed line, the `box(es)` count and the drawn figure show it.
