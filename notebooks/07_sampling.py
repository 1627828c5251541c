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
# # 07 · Choosing the next token: greedy, temperature, top-k, top-p
#
# **Goal.** Turn one step's logits $z \in \mathbb{R}^V$ into a token, on real logits of the model.
#
# $$
# \begin{aligned}
# \text{greedy:}\quad & \text{id} = \arg\max_v z_v \\
# \text{temperature } \tau:\quad & p = \operatorname{softmax}(z / \tau)
#   \quad(\tau < 1 \text{ sharpens}, \tau > 1 \text{ flattens}) \\
# \text{top-}k:\quad & \text{keep the } k \text{ largest } z_v \text{, the rest get } p_v = 0 \\
# \text{top-}p:\quad & \text{sort } p \text{ descending; keep token } i \iff \textstyle\sum_{j<i} p_{(j)} < p_{\text{top}}
#   \text{ (the top token always), renormalise} \\
# \text{draw:}\quad & u \sim U[0, 1),\quad \text{id} = \min\{\, i : \operatorname{cumsum}(p)_i > u \,\}
# \end{aligned}
# $$
#
# The order temperature → top-k → top-p is HF's. PaliGemma's mix checkpoints expect greedy
# decoding (the default); sampling gives variety. Code: `npvlm/generation/sampling.py`
# (`filtered_probs`, `choose`).

# %%
# The model these notebooks run on. "demo" is the small PaliGemma embedded in npvlm
# (npvlm/demo/model). Set MODEL to a real checkpoint folder instead, e.g. a downloaded
# google/paligemma-3b-mix-224 (docs/checkpoints.md): every size is read from model.cfg.
MODEL = "demo"

import warnings

import matplotlib.pyplot as plt
import numpy as np

import npvlm
from npvlm.demo import SAMPLE_SCENE
from npvlm.generation.sampling import SamplingOptions, choose, filtered_probs, row_generators
from npvlm.parity import GOLDENS, compare

plt.rcParams.update({"figure.dpi": 72})

model = npvlm.load(MODEL)
cfg, tok = model.cfg, model.tokenizer
print(model)


def piece(i):
    """The vocabulary entry of an id ('▁' marks a leading space); embedding rows past the vocabulary have none."""
    return tok.piece(i) or f"<row {i}>"

# %% [markdown]
# ## 1. Real logits
#
# Generate a caption greedily, keeping the logits of every step, and pick the step where the
# model was least sure (highest entropy): that distribution is the interesting one to sample from.

# %%
PROMPT, NEW = "caption en", 16
inputs = model.processor([SAMPLE_SCENE], [PROMPT])
T = inputs["input_ids"].shape[1]
cache = model.new_cache(1, T + NEW)
logits = model.prefill(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], cache=cache)
steps, ids = [], []
for t in range(NEW):
    steps.append(logits)
    ids.append(int(logits.argmax(-1)[0]))
    if ids[-1] == cfg.eos_token_id or t == NEW - 1:
        break
    logits = model.decode_step(np.array([ids[-1]]), cache)
print(f"greedy: {tok.decode(ids)!r} ({len(ids)} tokens)")


def entropy(probs):
    return float(-(probs * np.log(np.where(probs > 0, probs, 1))).sum())


ent = [entropy(filtered_probs(z, 1.0)[0]) for z in steps]
step = int(np.argmax(ent))
z = steps[step]                                                   # [1, V]
print(f"entropy per step (nats): {np.round(ent, 2).tolist()}")
print(f"step {step} (after {tok.decode(ids[:step])!r}): logits {list(z.shape)}, greedy choice {piece(ids[step])!r}")

# %% [markdown]
# ## 2. Temperature
#
# Dividing the logits by $\tau$ before the softmax: small $\tau$ moves all mass to the top token
# (greedy is the limit $\tau \to 0$), large $\tau$ spreads it over many tokens.

# %%
TOP = 12
p1 = filtered_probs(z, 1.0)[0]
top = np.argsort(-p1)[:TOP]
names = [repr(piece(i))[1:-1] for i in top]
fig, ax = plt.subplots(figsize=(9, 3))
for j, tau in enumerate([0.5, 1.0, 2.0]):
    probs = filtered_probs(z, tau)[0]
    ax.bar(np.arange(TOP) + 0.27 * (j - 1), probs[top], width=0.27, label=f"τ = {tau} (entropy {entropy(probs):.2f})")
ax.set_xticks(range(TOP), names, rotation=45, fontsize=9)
ax.set_ylabel("probability")
ax.set_title(f"the {TOP} most likely tokens at step {step}")
ax.legend(fontsize=8)
plt.show()

taus = np.geomspace(0.1, 10, 40)
fig, ax = plt.subplots(figsize=(5, 2.4))
ax.semilogx(taus, [entropy(filtered_probs(z, t)[0]) for t in taus])
ax.axhline(np.log(z.shape[-1]), ls="--", color="gray", lw=0.8, label="uniform over V")
ax.set_xlabel("temperature τ")
ax.set_ylabel("entropy (nats)")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## 3. Top-k and top-p
#
# Both cut the long tail of unlikely tokens, then renormalise. Top-k keeps a fixed number;
# top-p keeps the smallest set whose mass reaches $p$, so it keeps few tokens when the model is
# sure and many when it is not.

# %%
K, TOP_P = 5, 0.95
filters = {"none": filtered_probs(z, 1.0)[0], f"top_k={K}": filtered_probs(z, 1.0, top_k=K)[0],
           f"top_p={TOP_P}": filtered_probs(z, 1.0, top_p=TOP_P)[0]}
fig, axes = plt.subplots(1, 3, figsize=(11, 2.8), sharey=True)
for ax, (name, probs) in zip(axes, filters.items()):
    kept = probs[top] > 0
    ax.bar(range(TOP), probs[top], color=np.where(kept, "tab:blue", "lightgray"))
    ax.set_xticks(range(TOP), names, rotation=60, fontsize=8)
    ax.set_title(f"{name}: {int((probs > 0).sum())} of {probs.size} tokens kept", fontsize=10)
plt.show()
sorted_p = np.sort(p1)[::-1]
print(f"top_p={TOP_P}: the {int((filters[f'top_p={TOP_P}'] > 0).sum())} kept token(s) held "
      f"{sorted_p[:int((filters[f'top_p={TOP_P}'] > 0).sum())].sum():.3f} of the mass before renormalising")

# %% [markdown]
# ## 4. The draw
#
# `choose(logits, options, rngs)` filters on the model's backend and draws with one uniform
# number per row from a seeded NumPy generator, by inverse CDF. The same seed gives the same
# tokens (on CuPy too). `rngs` is one `np.random.Generator`, drawn from for every row, or a list
# of them, one per row. Over many draws the frequencies match the filtered distribution.

# %%
options = SamplingOptions(temperature=1.0, top_p=TOP_P, seed=0)
rng = np.random.default_rng(options.seed)
draws = np.concatenate([choose(z, options, rng) for _ in range(400)])
counts = np.bincount(draws, minlength=z.shape[-1]) / draws.size
probs = filters[f"top_p={TOP_P}"]
kept = np.flatnonzero(probs)[np.argsort(-probs[np.flatnonzero(probs)])][:TOP]
fig, ax = plt.subplots(figsize=(7, 2.6))
ax.bar(np.arange(len(kept)) - 0.2, probs[kept], width=0.4, label="filtered probs")
ax.bar(np.arange(len(kept)) + 0.2, counts[kept], width=0.4, label="frequency in 400 draws")
ax.set_xticks(range(len(kept)), [repr(piece(i))[1:-1] for i in kept], rotation=45, fontsize=9)
ax.legend(fontsize=8)
plt.show()
print("greedy choice:", repr(piece(choose(z, SamplingOptions(), None)[0])))       # greedy draws nothing

# A batch of two identical rows: one shared generator gives each row its own number; one
# generator per row, all seeded alike (`row_generators`, what `generate` uses), makes each row
# sample what it would sample alone, whatever else is in the batch.
z2 = np.concatenate([z, z])                                                        # [2, V]
shared = [choose(z2, options, rng).tolist() for _ in range(5)]
rows = row_generators(options.seed, 2)
per_row = [choose(z2, options, rows).tolist() for _ in range(5)]
print("one generator:       ", [[piece(i) for i in pair] for pair in shared])
print("row_generators(0, 2):", [[piece(i) for i in pair] for pair in per_row])

# %% [markdown]
# The same options through `model.generate`: greedy is deterministic, sampling varies with the seed.

# %%
print(f"greedy      {model.generate(SAMPLE_SCENE, PROMPT, max_new_tokens=NEW).text!r}")
for seed in range(3):
    out = model.generate(SAMPLE_SCENE, PROMPT, max_new_tokens=NEW, temperature=1.0, top_p=0.9, seed=seed)
    print(f"seed {seed}, T=1, top_p=0.9: {out.text!r}")

# %% [markdown]
# ## Check against Hugging Face
#
# The golden model `pg1_mqa_hub`: our last-position logits equal HF's; greedy choice from them
# gives HF's first greedy token; the filtered distributions made from our logits equal those made
# from HF's logits. These use only the committed goldens (no torch needed). When torch +
# transformers are installed, the filters are also compared with HF's own logits warpers
# (`TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`), as `tests/test_sampling.py`
# does; without them that part is skipped with a note.

# %%
golden = dict(np.load(GOLDENS / "pg1_mqa_hub" / "goldens.npz"))
gm = npvlm.load(GOLDENS / "pg1_mqa_hub" / "model")
ours = gm.prefill(golden["input_ids"], golden["attention_mask"], golden["pixel_values"])       # [B, V]
hf_last = golden["logits"][:, -1]                          # left-padded: every row ends in the last column
checks = [compare("logits (last position)", ours, hf_last)]
first = choose(ours, SamplingOptions(), None)
print("greedy choice equals HF's first greedy token:", np.array_equal(first, golden["greedy_tokens"][:, 0]))
settings = [(0.7, 0, 1.0), (1.0, 20, 1.0), (1.0, 0, 0.9), (1.3, 50, 0.8)]
for tau, k, top_p in settings:
    checks.append(compare(f"filtered τ={tau} k={k} p={top_p}", filtered_probs(ours, tau, k, top_p),
                          filtered_probs(hf_last, tau, k, top_p)))
try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch
        from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
except ImportError:
    print("torch/transformers not installed: skipping the comparison with HF's warpers (pip install -e '.[reference]')")
else:
    for tau, k, top_p in settings:
        scores = torch.from_numpy(hf_last.astype(np.float32))
        for warper in [TemperatureLogitsWarper(tau)] + ([TopKLogitsWarper(k)] if k else []) + \
                      ([TopPLogitsWarper(top_p)] if top_p < 1 else []):
            scores = warper(None, scores)
        hf_p = torch.softmax(scores, dim=-1).numpy()
        checks.append(compare(f"HF warpers τ={tau} k={k} p={top_p}", filtered_probs(hf_last, tau, k, top_p), hf_p))
for c in checks:
    print(c)
assert np.array_equal(first, golden["greedy_tokens"][:, 0]) and all(c.ok for c in checks)

# %% [markdown]
# ## Exercises
#
# 1. In section 3, set `TOP_P = 0.99`, then `TOP_P = 0.3`, and rerun. Predict how many tokens
#    each keeps compared with `top_k=5` (at this uncertain step; see the entropy printed in
#    section 1); the panel titles `... tokens kept` show it.
# 2. In section 4, change the seed: `SamplingOptions(temperature=1.0, top_p=TOP_P, seed=1)`.
#    Predict whether the bars of 400 draws change much, and whether the two lines of the
#    two-row batch still show equal pairs with `row_generators`; rerun the cell to see.
# 3. In the `model.generate` cell, use `temperature=0.1` instead of `1.0`. Predict how many of
#    the three seeds give the greedy caption (the temperature plot of section 2 shows how sharp
#    the distribution gets); the printed lines show it.
