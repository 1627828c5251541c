"""Explanation goldens: what `PaliGemma.explain` computes, from transformers and torch autograd.

    python tests/make_explain_goldens.py    # writes tests/goldens/<model>/explain.npz + explain_meta.json

For each golden model (tests/goldens/<model>/model, made by tests/make_goldens.py): a prompt
`<image>*N <bos> 4 ids "\\n"` and an answer of 4 ids + <eos> (random, seeded), run through
transformers 5.24 `PaliGemmaForConditionalGeneration` (eager attention, fp32) as one sequence
with token_type_ids 0 on the prompt and 1 on the answer, positions from the mask. Written, for
answer token i predicted at p_i (npvlm/explain/attribute.py):

- `logprobs` [n]: log_softmax(logits[p_i])[a_i] (Gemma 2's final softcap is in HF's logits);
- `image_attention` [n, L, Hq, N]: each decoder layer's eager `attn_weights` at the query p_i
  over the image positions;
- `pixel_grads` [n, C, R, R]: torch.autograd.grad(logprobs[i], pixel_values);
- `logit_lens` [n, L + 1], `lens_top_ids`, `lens_top_logprobs` [n, L + 1, k], `lens_rank`: the
  input of decoder layer 0 and every layer's output at p_i, through `language_model.norm`, the
  lm_head and the softcap, log_softmax;
- `noise.<name>`: max |fp32 - fp64| of torch's own result (the model run in float64), per answer
  token for `pixel_grads`: the rounding floor a tolerance may rise to.

Needs the reference extra: pip install -e '.[reference]'. Deterministic for fixed versions.
"""

import copy
import json

import numpy as np
import torch
from transformers import PaliGemmaForConditionalGeneration

import hf_reference as ref
from helpers import EXPLAIN_FORMAT_VERSION, GOLDEN_MODELS, GOLDENS

SEED = 11
PROMPT_IDS, ANSWER_IDS, TOP_K = 4, 4, 5


def make_inputs(spec):
    """(prompt ids int[1, T0], answer ids [n] with <eos> last, pixel_values float32[1, 3, R, R])."""
    rng = np.random.default_rng(SEED)
    special = {ref.PAD_ID, ref.EOS_ID, ref.BOS_ID, spec["image_token_index"], ref.newline_id(spec)}
    pool = np.array([i for i in range(spec["text"]["vocab_size"]) if i not in special])
    prompt = ([spec["image_token_index"]] * ref.num_image_tokens(spec) + [ref.BOS_ID]
              + rng.choice(pool, PROMPT_IDS).tolist() + [ref.newline_id(spec)])
    answer = rng.choice(pool, ANSWER_IDS).tolist() + [ref.EOS_ID]
    side = spec["vision"]["image_size"]
    return np.array([prompt]), np.array(answer), rng.uniform(-1, 1, (1, 3, side, side)).astype(np.float32)


def reference(model, prompt, answer, pixels, image_token_index):
    """What npvlm's Explanation holds, from transformers (in the model's dtype)."""
    T0, n = prompt.shape[1], len(answer)
    ids = np.concatenate([prompt, answer[None]], axis=1)
    types = np.concatenate([np.zeros_like(prompt), np.ones((1, n), np.int64)], axis=1)
    t_ids, mask, tti, pix = ref._tensors(ids, np.ones_like(ids), types, pixels)
    pix = pix.to(model.dtype).requires_grad_()
    positions = list(range(T0 - 1, T0 - 1 + n))
    stream, attn = {}, {}
    _, lm = ref._towers(model)
    handles = [lm.layers[0].register_forward_pre_hook(
        lambda _m, args, kwargs: stream.__setitem__(0, args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True)]
    for i, layer in enumerate(lm.layers):
        handles.append(layer.register_forward_hook(
            lambda _m, _inputs, out, i=i: stream.__setitem__(i + 1, ref._first_tensor(out))))
        handles.append(layer.self_attn.register_forward_hook(
            lambda _m, _inputs, out, i=i: attn.__setitem__(i, out[1].detach())))
    try:
        out = model(input_ids=t_ids, attention_mask=mask, token_type_ids=tti, pixel_values=pix,
                    position_ids=ref.position_ids_from_mask(mask), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    logp = torch.log_softmax(out.logits[0, positions], dim=-1)
    target = torch.as_tensor(answer)
    logprobs = logp[torch.arange(n), target]
    grads = [torch.autograd.grad(logprobs[i], pix, retain_graph=True)[0][0] for i in range(n)]
    image = np.flatnonzero(prompt[0] == image_token_index)
    L, H = len(lm.layers), attn[0].shape[1]
    for l in range(L):                  # [1, Hq, queries, keys]: each query's row is a distribution over keys
        sums = attn[l][0].sum(-1)        # (HF's eager softmax runs in fp32 even in a float64 model)
        torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=1e-5)
    # entry by entry, written out (not the indexing npvlm uses): [token i, layer l, head h, image position j]
    attention = torch.tensor([[[[float(attn[l][0, h, positions[i], j]) for j in image] for h in range(H)]
                               for l in range(L)] for i in range(n)], dtype=torch.float64)

    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    with torch.no_grad():
        r = torch.stack([stream[l][0, positions] for l in range(len(lm.layers) + 1)], dim=1)   # [n, L+1, D]
        z = model.lm_head(lm.norm(r))
        if cap is not None:
            z = torch.tanh(z / cap) * cap
        lens_logp = torch.log_softmax(z, dim=-1)
        mine = lens_logp.gather(-1, target[:, None, None].expand(n, r.shape[1], 1))[..., 0]
        top = lens_logp.topk(TOP_K, dim=-1)
        rank = (lens_logp > mine[..., None]).sum(-1)
    def f32(t):
        return t.detach().to(torch.float32).numpy().copy()

    return {"logprobs": f32(logprobs), "image_attention": f32(attention), "pixel_grads": f32(torch.stack(grads)),
            "logit_lens": f32(mine), "lens_top_ids": top.indices.numpy().astype(np.int64),
            "lens_top_logprobs": f32(top.values), "lens_rank": rank.numpy().astype(np.int64)}


def make(name):
    folder = GOLDENS / name / "model"
    spec = json.loads((GOLDENS / "meta.json").read_text())["models"][name]["spec"]
    hf = PaliGemmaForConditionalGeneration.from_pretrained(folder, attn_implementation="eager",
                                                           dtype=torch.float32).eval()
    prompt, answer, pixels = make_inputs(spec)
    got = reference(hf, prompt, answer, pixels, spec["image_token_index"])
    exact = reference(copy.deepcopy(hf).double(), prompt, answer, pixels, spec["image_token_index"])
    arrays = {"batch.input_ids": prompt, "batch.pixel_values": pixels, "tokens": answer, **got}
    for key in ("logprobs", "image_attention", "logit_lens", "lens_top_logprobs"):
        arrays[f"noise.{key}"] = np.float32(np.abs(got[key] - exact[key]).max())
    arrays["noise.pixel_grads"] = np.abs(got["pixel_grads"] - exact["pixel_grads"]).reshape(len(answer), -1) \
        .max(axis=1).astype(np.float32)
    np.savez_compressed(GOLDENS / name / "explain.npz", **arrays)
    print(f"{name}: answer {answer.tolist()}, logprobs {np.round(got['logprobs'], 4).tolist()}, "
          f"pixel grad noise {arrays['noise.pixel_grads'].max():.1e}")
    return {"prompt_ids": prompt[0].tolist(), "answer_ids": answer.tolist(), "top_k": TOP_K,
            "logprobs": got["logprobs"].tolist()}


def main():
    meta = {"format_version": EXPLAIN_FORMAT_VERSION, "generated_by": "python tests/make_explain_goldens.py",
            "versions": ref.versions(), "seed": SEED, "models": {}}
    torch.manual_seed(0)
    for name in GOLDEN_MODELS:
        meta["models"][name] = make(name)
    (GOLDENS / "explain_meta.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
