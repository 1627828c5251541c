"""Generation: prefill once, then one cached decode step per new token; ids in, text out.

    prefill:  the whole prompt batch [B, T] in one pass -> KV cache filled, logits [B, V]
    decode:   for t = 1 .. max_new_tokens-1: choose a token per row, run it alone [B, 1]
              against the cache (its mask: every real cached key; positions continue per row)

Only the chosen token ids cross from the device to the host each step (token ids going the
other way are checked on the host first, npvlm/api.py). On the host, each row's text is
decoded as its ids arrive (`RowText`): stop strings end a row, and `stream` receives text as
soon as it is final.
"""

import time
from dataclasses import dataclass, field

import numpy as np

from ..backend import synchronize, to_host
from ..errors import InputError
from ..inputs.image import load_image
from ..tasks.detection import ParseResult, parse_detections
from .sampling import SamplingOptions, choose, row_generators


@dataclass
class TokenGeneration:
    """tokens: int64[B, n] (rows that stopped early are padded with pad_token_id after their
    last token); lengths: int[B] generated tokens per row (the stop token included);
    finish: per row "eos", "stop" or "length"; timings in seconds; logprobs: float32[B, n],
    log p of each chosen token under the model's distribution (before any sampling filter), when
    asked for."""
    tokens: np.ndarray
    lengths: np.ndarray
    finish: list
    timings: dict = field(default_factory=dict)
    logprobs: np.ndarray = None


@dataclass
class Generation:
    """One row's answer. `text` is what HF's `decode(..., skip_special_tokens=True)` gives for
    `tokens` (eos dropped, <loc>/<seg> kept), cut before a stop string if one was hit."""
    text: str
    tokens: list            # generated ids, the final eos included when generation hit it
    finish_reason: str      # "eos", "stop" (a stop string) or "length" (max_new_tokens)
    timings: dict = field(default_factory=dict)
    image_size: tuple = None  # (width, height) of the original image, for mapping boxes
    logprobs: list = None     # log p of each of `tokens` under the model (generate(logprobs=True))

    def __str__(self):
        return self.text

    def detections(self, divisor=1024):
        """The `<loc>`/`<seg>` records of the text as objects with boxes in the original image's
        pixels, plus any malformed records (npvlm.tasks.detection.parse_detections). An answer without
        any `<loc>` token (a caption, a VQA answer) is not a detection answer: no objects, no
        problems."""
        if "<loc" not in self.text:
            return ParseResult((), ())
        width, height = self.image_size
        return parse_detections(self.text, width, height, divisor)


def check_generation_args(cfg, prompt_len, max_new_tokens):
    """One-line errors for a bad max_new_tokens or a prompt that does not fit the positions."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
            or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    limit = cfg.text.max_position_embeddings
    if prompt_len + max_new_tokens > limit:
        raise InputError(f"prompt ({prompt_len} tokens, {cfg.num_image_tokens} of them image tokens) "
                         f"+ max_new_tokens ({max_new_tokens}) = {prompt_len + max_new_tokens} exceeds "
                         f"the model's {limit} positions; shorten the prompt or lower max_new_tokens")


GREEDY = SamplingOptions()


def encode_and_prefill(model, batch, capacity):
    """Encode the images and prefill the prompt batch into a new cache of `capacity` tokens.
    Returns (next-token logits [B, V], cache, timings)."""
    xp = model.xp
    t0 = time.perf_counter()
    image_tokens = None
    if batch.get("pixel_values") is not None:
        image_tokens = model.encode_images(batch["pixel_values"])
        synchronize(xp)
    t1 = time.perf_counter()
    cache = model.new_cache(len(batch["input_ids"]), capacity)
    logits = model.prefill({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                            "image_tokens": image_tokens}, cache=cache)
    synchronize(xp)
    timings = dict(image_encode_s=t1 - t0, prefill_s=time.perf_counter() - t1,
                   prefill_tokens=int(np.size(batch["input_ids"])))
    return logits, cache, timings


def chosen_logprobs(logits, ids, xp):
    """log softmax(logits)[b, ids[b]] per row, on the host: float32 [B] (the log-sum-exp taken
    about each row's maximum)."""
    z = logits.astype(xp.float32)
    m = z.max(axis=-1)
    lse = m + xp.log(xp.exp(z - m[:, None]).sum(axis=-1))
    picked = z[xp.arange(z.shape[0]), xp.asarray(ids)]
    return np.asarray(to_host(picked - lse), np.float32)


def generate_ids(model, batch, max_new_tokens=32, options=GREEDY, stop_ids=None, on_step=None, logprobs=False):
    """Generate up to `max_new_tokens` per row of a left-padded batch (host NumPy arrays:
    input_ids, attention_mask, optional pixel_values).

    stop_ids: token ids that end a row (the eos id, normally); the stop token is kept in
    `tokens` and counted in `lengths`.
    on_step(t, ids, active) -> bool[B] or None: called with the host ids chosen at step t and
    the rows still running; may return rows to stop (stop strings, streaming).
    logprobs: also return each chosen token's log-probability (one log-sum-exp over the
    vocabulary per step).
    """
    B, T = np.shape(batch["input_ids"])
    check_generation_args(model.cfg, T, max_new_tokens)
    rngs = row_generators(options.seed, B)
    stop = np.array(sorted(set(stop_ids or ())), dtype=np.int64)
    t0 = time.perf_counter()
    logits, cache, timings = encode_and_prefill(model, batch, T + max_new_tokens)

    tokens = np.full((B, max_new_tokens), model.cfg.pad_token_id, dtype=np.int64)
    lengths = np.zeros(B, dtype=np.int64)
    finish = ["length"] * B
    active = np.ones(B, dtype=bool)
    lps = np.zeros((B, max_new_tokens), np.float32) if logprobs else None
    for t in range(max_new_tokens):
        ids = choose(logits, options, rngs)                                 # host int64 [B]
        if t == 0:
            first_token_at = time.perf_counter()
        if logprobs:
            lps[:, t] = chosen_logprobs(logits, ids, model.xp)
        ids[~active] = model.cfg.pad_token_id
        tokens[active, t] = ids[active]
        lengths[active] += 1
        ended = active & np.isin(ids, stop)
        requested = on_step(t, ids, active.copy()) if on_step is not None else None
        stopped = np.zeros(B, bool) if requested is None else np.asarray(requested) & active & ~ended
        for row in np.flatnonzero(ended | stopped):
            finish[row] = "eos" if ended[row] else "stop"
        active &= ~(ended | stopped)
        if not active.any() or t == max_new_tokens - 1:
            break
        logits = model.decode_step(ids, cache)
    synchronize(model.xp)
    steps = int(lengths.max()) if B else 0
    timings.update(time_to_first_token_s=first_token_at - t0, decode_s=time.perf_counter() - first_token_at,
                   decode_steps=max(steps - 1, 0))
    timings["decode_tokens_per_s"] = (timings["decode_steps"] / timings["decode_s"]
                                      if timings["decode_steps"] and timings["decode_s"] > 0 else None)
    n = max(steps, 1)
    return TokenGeneration(tokens[:, :n], lengths, finish, timings, None if lps is None else lps[:, :n])


def greedy_ids(model, input_ids, attention_mask, pixel_values=None, max_new_tokens=32, stop_ids=None):
    """Greedy decoding (HF `generate(do_sample=False)`); host int64 [B, max_new_tokens], rows
    that stopped early padded with the pad id."""
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}
    out = generate_ids(model, batch, max_new_tokens, GREEDY, stop_ids)
    tokens = np.full((out.tokens.shape[0], max_new_tokens), model.cfg.pad_token_id, np.int64)
    tokens[:, :out.tokens.shape[1]] = out.tokens
    return tokens


class RowText:
    """One row's answer as text, while it is generated.

    `push(id)` decodes the id (byte-fallback pieces wait until their character is complete) and
    returns True once the text holds one of the `stops`. `stream(piece)`, if given, receives
    text as soon as it is final: up to a stop string, and never a tail that could still grow
    into one (held back until it cannot; shown text is never taken back). `finish(ids)` gives
    the final text (equal to `tokenizer.decode(ids)` cut at the first stop string) and whether
    a stop string ended it, and streams whatever was held back.
    """

    def __init__(self, tokenizer, stops=(), stream=None):
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.stream = stream
        self._decoder = tokenizer.stream_decoder()
        self._text = ""          # decoded so far (complete characters only)
        self._shown = ""         # what `stream` has received
        self._cut = None         # where the first stop string begins

    def _first_stop(self, text):
        hits = [text.find(s) for s in self.stops if s in text]
        return min(hits) if hits else None

    def _visible(self):
        if self._cut is not None:
            return self._text[:self._cut]
        text = self._text
        hold = max((n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        return text[:len(text) - hold]

    def _show(self, text):
        if self.stream is not None and len(text) > len(self._shown):
            self.stream(text[len(self._shown):])
            self._shown = text

    def push(self, token_id):
        self._text += self._decoder.push(int(token_id))
        self._cut = self._first_stop(self._text)
        self._show(self._visible())
        return self._cut is not None

    def finish(self, ids):
        text = self.tokenizer.decode(ids)
        # also catches a stop string completed by bytes still pending when the loop ended
        cut = self._first_stop(text)
        if cut is not None:
            text = text[:cut]
        self._show(text)
        return text, cut is not None


def _as_lists(images, prompts):
    """(images list, prompts list, single): one image per prompt; a single prompt string goes
    with one image, or is asked of every image of a list."""
    if isinstance(prompts, str):
        if isinstance(images, (list, tuple)):
            return list(images), [prompts] * len(images), False
        return [images], [prompts], True
    prompts = list(prompts)
    if not all(isinstance(prompt, str) for prompt in prompts):
        raise InputError("prompts must be strings")
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if len(images) != len(prompts):
        raise InputError(f"{len(images)} image(s) for {len(prompts)} prompt(s); give one image per "
                         "prompt, or one prompt string for all the images")
    return images, prompts, False


def generate(model, images, prompts, max_new_tokens=64, options=GREEDY, stop=None, stream=None, logprobs=False):
    """`PaliGemma.generate`: images + prompts -> Generation (or a list of them for list inputs)."""
    image_list, prompt_list, single = _as_lists(images, prompts)
    if stream is not None and len(prompt_list) != 1:
        raise InputError("streaming works with one prompt at a time")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stops):
        raise InputError(f"stop strings must be non-empty strings, got {stop!r}")
    processor = model.processor

    t0 = time.perf_counter()
    image_list = [load_image(img) for img in image_list]       # RGB, upright
    inputs = processor(image_list, prompt_list)
    check_generation_args(model.cfg, inputs["input_ids"].shape[1], max_new_tokens)
    t_pre = time.perf_counter() - t0

    rows = [RowText(processor.tokenizer, stops, stream) for _ in prompt_list]

    def on_step(t, ids, active):
        if not stops and stream is None:
            return None
        return np.array([bool(active[b]) and rows[b].push(ids[b]) for b in range(len(rows))])

    out = generate_ids(model, inputs, max_new_tokens, options, [model.cfg.eos_token_id], on_step, logprobs)
    timings = dict(out.timings, preprocess_s=t_pre, load_s=model.load_s)
    results = []
    for b, row in enumerate(rows):
        ids = out.tokens[b, :out.lengths[b]].tolist()
        text, stopped = row.finish(ids)
        results.append(Generation(text, ids, "stop" if stopped else out.finish[b], timings,
                                  image_list[b].size,
                                  out.logprobs[b, :len(ids)].tolist() if logprobs else None))
    return results[0] if single else results
