"""The model math: PaliGemma's forward pass, its backward pass and the training loss, as plain
functions over arrays that import numpy alone (and npvlm's backend switch, config and errors).

    layers      linear, layer_norm, rms_norm, gelu_tanh, softmax, softcap (+ the axis legend)
    rope        1-indexed positions and rotary embeddings
    masks       the prefix-LM mask, Gemma 2's sliding window, decode-step masks
    attention   grouped-query attention with Gemma 2's logit cap
    kv_cache    the preallocated key/value cache
    siglip      the vision tower
    gemma       the Gemma and Gemma 2 decoder layers, the embedding and the tied head
    paligemma   prefill, decode_step, forward_loss and backward: the whole model
    loss        the suffix-only cross-entropy
    record      what a forward keeps for its backward (`save`) and its named outputs (`trace`)

Each forward has its `_backward` right after it (npvlm/model/layers.py states the template).
"""
