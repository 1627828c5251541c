"""`npvlm.load(path)`: a model folder -> a ready PaliGemma on the chosen backend, and
`model.generate(images, prompts)`: text in, text out."""

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import paligemma
from .backend import get_backend, to_device
from .config import load_config
from .errors import CheckpointError, ConfigError, InputError
from .generate import check_generation_args, generate_ids
from .sampling import SamplingOptions
from .bf16 import BF16Matrix
from .weights import check_weights_mode, load_params


@dataclass
class Generation:
    """One row's answer. `text` is what HF's `decode(..., skip_special_tokens=True)` gives for
    `tokens` (eos dropped, <loc>/<seg> kept), cut before a stop string if one was hit."""
    text: str
    tokens: list            # generated ids, the final eos included when generation hit it
    finish_reason: str      # "eos", "stop" (a stop string) or "length" (max_new_tokens)
    timings: dict = field(default_factory=dict)
    image_size: tuple = None  # (width, height) of the original image, for mapping boxes

    def __str__(self):
        return self.text

    def detections(self, divisor=1024):
        """The `<loc>`/`<seg>` records of the text as objects with boxes in the original image's
        pixels, plus any malformed records (npvlm.detection.parse_detections). An answer without
        any `<loc>` token (a caption, a VQA answer) is not a detection answer: no objects, no
        problems."""
        from .detection import ParseResult, parse_detections  # noqa: PLC0415
        if "<loc" not in self.text:
            return ParseResult((), ())
        width, height = self.image_size
        return parse_detections(self.text, width, height, divisor)


class PaliGemma:
    """A loaded model: its config, its parameter tree (on the backend's device), `xp`, and the
    processor (tokenizer + image preprocessing) when the folder has a tokenizer.model.

    The math lives in plain functions (`npvlm.paligemma`, `npvlm.siglip`, `npvlm.gemma`); this
    object only holds what they need, so a notebook can call any of them on `model.params`.
    """

    def __init__(self, cfg, params, xp, path=None, processor=None, load_s=None):
        self.cfg = cfg
        self.params = params
        self.xp = xp
        self.path = path
        self._processor = processor
        self.load_s = load_s
        # "bf16" when the matrices are kept in bfloat16 (npvlm.load(..., weights="bf16"))
        self.weights = "bf16" if isinstance(params["text"]["embed_tokens"]["weight"], BF16Matrix) else "fp32"

    @property
    def backend(self):
        return self.xp.__name__

    @property
    def processor(self):
        if self._processor is None:
            raise CheckpointError(f"{self.path}/tokenizer.model: file not found; text generation needs "
                                  "the model's SentencePiece tokenizer next to config.json")
        return self._processor

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    # ---- array-level API (token ids in, logits out) -------------------------------------------

    def new_cache(self, batch, capacity):
        return paligemma.new_cache(self.cfg, batch, capacity, self.params["text"]["norm"]["weight"])

    def encode_images(self, pixel_values, trace=None):
        """float32[B, 3, S, S] -> image tokens [B, N, D] on the device."""
        return paligemma.encode_images(self.params, self.cfg,
                                       self.xp.asarray(pixel_values, dtype=self.xp.float32), trace)

    def prefill(self, input_ids, attention_mask, pixel_values=None, token_type_ids=None,
                cache=None, logits_for="last", trace=None, image_tokens=None):
        xp = self.xp
        return paligemma.prefill(
            self.params, self.cfg, xp.asarray(input_ids), xp.asarray(attention_mask),
            None if pixel_values is None else xp.asarray(pixel_values, dtype=xp.float32),
            None if token_type_ids is None else xp.asarray(token_type_ids),
            cache, logits_for, trace, image_tokens)

    def decode_step(self, token_ids, cache, trace=None):
        return paligemma.decode_step(self.params, self.cfg, self.xp.asarray(token_ids), cache, trace)

    # ---- text-level API -----------------------------------------------------------------------

    def generate(self, images, prompts, max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0,
                 seed=None, stop=None, stream=None):
        """Answer prompts about images.

        images: one image (path, PIL image or HWC array) or a list; prompts: a string or a list
        of the same length. Greedy by default; `temperature`/`top_k`/`top_p`/`seed` sample
        (npvlm.sampling). Generation ends at eos, at any of the `stop` strings (cut from the
        text), or after `max_new_tokens`. `stream(text_piece)` receives text as it is produced
        (single prompt only). Returns a Generation, or a list of them for list inputs.
        """
        single = isinstance(prompts, str)
        prompt_list = [prompts] if single else list(prompts)
        image_list = [images] if single or not isinstance(images, (list, tuple)) else list(images)
        if not all(isinstance(p, str) for p in prompt_list):
            raise InputError("prompts must be strings")
        if len(image_list) != len(prompt_list):
            raise InputError(f"{len(image_list)} image(s) for {len(prompt_list)} prompt(s); give one "
                             "image per prompt")
        if stream is not None and len(prompt_list) != 1:
            raise InputError("streaming works with one prompt at a time")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise InputError(f"stop strings must be non-empty strings, got {stop!r}")
        options = SamplingOptions(temperature, top_k, top_p, seed)
        processor = self.processor

        t0 = time.perf_counter()
        from .image import load_image  # noqa: PLC0415
        image_list = [load_image(img) for img in image_list]       # RGB, upright
        inputs = processor(image_list, prompt_list)
        check_generation_args(self.cfg, inputs["input_ids"].shape[1], max_new_tokens)
        t_pre = time.perf_counter() - t0

        tok = processor.tokenizer
        B = len(prompt_list)
        decoders = [tok.stream_decoder() for _ in range(B)]
        texts = [""] * B          # text decoded so far (complete characters only)
        shown = [""] * B          # what `stream` has received
        cut = [None] * B          # where a stop string begins

        def visible(row):
            """Text safe to show: up to a stop string, and without a tail that could still grow
            into one (held back until it cannot; this never un-shows text)."""
            text = texts[row]
            if cut[row] is not None:
                return text[:cut[row]]
            hold = max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
            return text[:len(text) - hold]

        def on_step(t, ids, active):
            requested = np.zeros(B, dtype=bool)
            if not stops and stream is None:
                return requested
            for row in np.flatnonzero(active):
                texts[row] += decoders[row].push(int(ids[row]))
                hits = [texts[row].find(s) for s in stops if s in texts[row]]
                if hits:
                    cut[row] = min(hits)
                    requested[row] = True
                if stream is not None:
                    text = visible(row)
                    if len(text) > len(shown[row]):
                        stream(text[len(shown[row]):])
                        shown[row] = text
            return requested

        out = generate_ids(self, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                           max_new_tokens, options, stop_ids=[self.cfg.eos_token_id], on_step=on_step)
        timings = dict(out.timings, preprocess_s=t_pre, load_s=self.load_s)
        results = []
        for row in range(B):
            ids = out.tokens[row, :out.lengths[row]].tolist()
            text = tok.decode(ids)
            finish = out.finish[row]
            # also catches a stop string completed by bytes still pending when the loop ended
            hits = [text.find(s) for s in stops if s in text]
            if hits:
                text, finish = text[:min(hits)], "stop"
            if stream is not None and len(text) > len(shown[row]):
                stream(text[len(shown[row]):])       # the held-back tail, and flushed bytes
            results.append(Generation(text, ids, finish, timings, image_list[row].size))
        return results[0] if single else results

    def __repr__(self):
        v, t = self.cfg.vision, self.cfg.text
        return (f"PaliGemma({t.model_type}, image {v.image_size}px -> {v.num_patches} tokens, "
                f"text {t.num_hidden_layers}x{t.hidden_size}, vocab {t.vocab_size}, backend {self.backend}"
                f"{', weights bf16' if self.weights == 'bf16' else ''})")


DEMO_MODEL = Path(__file__).resolve().parent / "demo_model"
SAMPLE_SCENE = Path(__file__).resolve().parent / "samples" / "scene.png"


def check_model_dir(path):
    """The folder for a model argument: "demo" names the embedded demo model (a local folder
    called demo is "./demo")."""
    if str(path) == "demo":
        path = DEMO_MODEL
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path}: the embedded demo model is missing from this installation; "
                              "reinstall npvlm or train it with `python tools/train_demo.py`")
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: model folder not found")
    if not path.is_dir():
        raise ConfigError(f"{path}: not a folder; pass the folder that holds config.json and the "
                          ".safetensors files")
    return path


def check_weights_option(weights, backend):
    """The `weights` choice of `load`, checked before anything is read."""
    check_weights_mode(weights)
    if weights == "bf16" and backend != "numpy":
        raise InputError('weights="bf16" is a CPU memory saving for the numpy backend; on a GPU '
                         "use the default fp32 weights")


def load(path, backend="numpy", weights="fp32"):
    """Load a PaliGemma model folder (config.json + safetensors [+ tokenizer.model]) onto
    `backend` ("numpy" or "cupy"); "demo" is the embedded demo model. Weights are checked
    strictly and widened to fp32 once; weights="bf16" keeps the matrices in bfloat16 instead
    (half the memory, slower decoding; NumPy only; npvlm/bf16.py)."""
    t0 = time.perf_counter()
    check_weights_option(weights, backend)
    path = check_model_dir(path)
    xp = get_backend(backend)          # fail before reading gigabytes if the backend is unusable
    cfg = load_config(path)
    processor = None
    if (path / "tokenizer.model").is_file():
        from .processor import Processor  # noqa: PLC0415 (needs sentencepiece + pillow)
        processor = Processor.from_model_dir(path, cfg)
    params = load_params(path, cfg, weights)
    if xp.__name__ != "numpy":
        params = to_device(params, xp)
    return PaliGemma(cfg, params, xp, path, processor, load_s=time.perf_counter() - t0)
