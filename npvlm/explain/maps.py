"""Maps for display, derived from an Explanation (npvlm/explain/attribute.py): one score per image
patch (a side x side grid, side = image_size / patch_size, SigLIP's row-major patch order) or per
pixel [R, R], for answer token i.

    gradient          |∂ logprob_i / ∂x| , the largest over the channels, per pixel; a patch's
                      score is the mean over its pixels (gradient saliency, Simonyan et al. 2014)
    input_x_gradient  Σ_c x_c ∂ logprob_i / ∂x_c per pixel, summed over a patch's pixels: the
                      first-order change of logprob_i if the patch went to x = 0, which after
                      PaliGemma's normalisation ((v / 255 - 0.5) / 0.5) is mid-grey; positive
                      where the pixels support the token (Shrikumar et al. 2016)
    attention         the attention probability of token i's query (at p_i) on each image
                      position, averaged over the chosen decoder layers and query heads (all by
                      default); a layer's heads sum to at most 1 over the image (the rest goes
                      to the text)

Every map is float32 and unnormalised; `normalised` scales one to [0, 1] (signed maps: by the
largest |value|, to [-1, 1]) for a heatmap.
"""

import numpy as np

MAP_KINDS = ("gradient", "input_x_gradient", "attention")


def grid_side(exp):
    """Patches per side of the image: sqrt(N)."""
    side = int(round(exp.image_attention.shape[-1] ** 0.5))
    return side


def per_patch(pixel_map, side, reduce="mean"):
    """[R, R] -> [side, side]: each patch's pixels averaged (or summed)."""
    R = pixel_map.shape[-1]
    p = R // side
    blocks = pixel_map[:side * p, :side * p].reshape(side, p, side, p)
    return (blocks.mean(axis=(1, 3)) if reduce == "mean" else blocks.sum(axis=(1, 3))).astype(np.float32)


def gradient_saliency(exp, i):
    """max_c |∂ logprob_i / ∂x_c| per pixel. -> [R, R]"""
    return np.abs(exp.pixel_grads[i]).max(axis=0)


def input_x_gradient(exp, i):
    """Σ_c x_c ∂ logprob_i / ∂x_c per pixel. -> [R, R]"""
    return (exp.pixel_values * exp.pixel_grads[i]).sum(axis=0)


def attention_on_image(exp, i, layers=None, heads=None):
    """Token i's attention on each image patch, averaged over `layers` and `heads` (indices or
    None for all). -> [side, side]"""
    a = exp.image_attention[i]                                          # [L, Hq, N]
    if layers is not None:
        a = a[np.atleast_1d(layers)]
    if heads is not None:
        a = a[:, np.atleast_1d(heads)]
    side = grid_side(exp)
    return a.mean(axis=(0, 1)).reshape(side, side).astype(np.float32)


def patch_map(exp, i, kind, layers=None, heads=None):
    """One patch score per image patch for answer token i, by `kind` (MAP_KINDS). -> [side, side]"""
    side = grid_side(exp)
    if kind == "gradient":
        return per_patch(gradient_saliency(exp, i), side, "mean")
    if kind == "input_x_gradient":
        return per_patch(input_x_gradient(exp, i), side, "sum")
    if kind == "attention":
        return attention_on_image(exp, i, layers, heads)
    raise ValueError(f"unknown map kind {kind!r}; choose one of {', '.join(MAP_KINDS)}")


def normalised(m):
    """A map scaled for display: [0, 1] by its maximum, or [-1, 1] by its largest |value| when it
    has negative entries; all zeros stays zeros."""
    m = np.asarray(m, np.float32)
    top = float(np.abs(m).max()) if m.size else 0.0
    return m / top if top > 0 else m
