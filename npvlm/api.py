"""`npvlm.load(path)`: a model folder -> a ready PaliGemma on the chosen backend, and
`model.generate(images, prompts)`: text in, text out.

`PaliGemma` only holds what the functions of `npvlm.model.paligemma` and
`npvlm.generation.generate` need (params, config, processor, backend); it is also the boundary
where inputs are checked, on the host, and move to the device once.
"""

import time

import numpy as np

from . import cpu
from .backend import get_backend, to_device, to_host
from .config import load_config
from .demo import MODEL_DIR as DEMO_MODEL
from .errors import CheckpointError, ConfigError, InputError
from .generation import generate as gen
from .generation.generate import Generation  # noqa: F401 (the result type of generate, importable from here)
from .generation.sampling import SamplingOptions
from .inputs.processor import Processor
from .loading import hub
from .loading.bf16 import BF16Matrix
from .loading.weights import check_weights_mode, load_params
from .model import paligemma


class PaliGemma:
    """A loaded model: its config, its parameter tree (on the backend's device), `xp`, and the
    processor (tokenizer + image preprocessing) when the folder has a tokenizer.model.

    The math lives in plain functions (`npvlm.model.paligemma`, `.siglip`, `.gemma`); this object
    only holds what they need, so a notebook can call any of them on `model.params`.
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
        self._threads = cpu.FIRST            # BLAS's count, chosen at the first computation (cpu.settle)

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

    # ---- array level: token ids in, logits out (the only host -> device step for inputs) -----

    def settle_threads(self):
        """On the CPU: apply this model's BLAS thread count, chosen from the machine's load at its
        first computation and kept (npvlm/cpu.py; npvlm.set_threads fixes it) -> the count now
        (None on the GPU, or where no BLAS can be set). Every computation calls it."""
        if self.xp is not np:
            return None
        self._threads = cpu.settle(self._threads)
        return cpu.blas_threads()

    def _ids(self, ids):
        """Token ids checked on the host, then moved to the device."""
        ids = np.asarray(to_host(ids))
        check_token_ids(ids, self.cfg)
        return self.xp.asarray(ids)

    BATCH_KEYS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values", "image_tokens", "labels")

    def device_batch(self, batch):
        """A processor batch (a dict of host arrays) checked and moved to this model's backend: the
        input of `paligemma.prefill` and of `training.grads.loss_and_grads`. Checked on the host
        first: the keys (an unknown one is an `InputError`), the token ids, the pixels' shape and
        one image's worth of <image> tokens per image."""
        unknown = sorted(set(batch) - set(self.BATCH_KEYS))
        if unknown:
            raise InputError(f"unknown batch key(s) {', '.join(map(repr, unknown))}; a batch holds "
                             f"{', '.join(self.BATCH_KEYS)}")
        self.settle_threads()
        ids = np.asarray(to_host(batch["input_ids"]))
        check_token_ids(ids, self.cfg)
        check_images(ids, batch.get("pixel_values"), batch.get("image_tokens"), self.cfg)
        xp = self.xp
        out = {"input_ids": xp.asarray(ids), "attention_mask": xp.asarray(batch["attention_mask"])}
        for key in ("token_type_ids", "labels"):
            if batch.get(key) is not None:
                out[key] = xp.asarray(batch[key])
        if batch.get("pixel_values") is not None:
            out["pixel_values"] = xp.asarray(batch["pixel_values"], dtype=xp.float32)
        if batch.get("image_tokens") is not None:
            out["image_tokens"] = batch["image_tokens"]
        return out

    def new_cache(self, batch, capacity):
        return paligemma.new_cache(self.cfg, batch, capacity, self.params["text"]["norm"]["weight"])

    def encode_images(self, pixel_values, trace=None):
        """float32[B, 3, R, R] -> image tokens [B, N, D] on the device."""
        check_pixel_values(pixel_values, self.cfg)
        self.settle_threads()
        return paligemma.encode_images(self.xp.asarray(pixel_values, dtype=self.xp.float32),
                                       self.params, self.cfg, trace=trace)

    def prefill(self, input_ids, attention_mask=None, pixel_values=None, token_type_ids=None,
                cache=None, logits_for="last", trace=None, image_tokens=None):
        """`paligemma.prefill` on this model. The inputs are either the processor's dict as the
        first argument (`model.prefill(model.processor(images, prompts))`) or the arrays one by
        one: input_ids, attention_mask int[B, T]; pixel_values float32[B, 3, R, R] or
        image_tokens [B, N, D]; token_type_ids int[B, T] (None: all prefix).
        logits_for="last" (default): logits [B, V] for the next token; "all": [B, T, V]."""
        if isinstance(input_ids, dict):
            batch = input_ids
        else:
            batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                     "pixel_values": pixel_values, "token_type_ids": token_type_ids,
                     "image_tokens": image_tokens}
        return paligemma.prefill(self.device_batch(batch), self.params, self.cfg, cache=cache,
                                 logits_for=logits_for, trace=trace)

    def decode_step(self, token_ids, cache, trace=None):
        """One token per row (host int[B]) against `cache`, after a prefill -> logits [B, V]."""
        return paligemma.decode_step(self._ids(token_ids), cache, self.params, self.cfg, trace=trace)

    # ---- text level ---------------------------------------------------------------------------

    def generate(self, images, prompts, max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0,
                 seed=None, stop=None, stream=None, logprobs=False):
        """Answer prompts about images.

        images: one image (path, PIL image or HWC array) or a list; prompts: a string (asked of
        every image) or a list of the same length. Greedy by default; `temperature`/`top_k`/
        `top_p`/`seed` sample (npvlm.generation.sampling). Generation ends at eos, at any of the `stop`
        strings (cut from the text), or after `max_new_tokens`. `stream(text_piece)` receives
        text as it is produced (single prompt only). `logprobs=True`: each Generation also holds
        `logprobs`, log p of each generated token under the model (the scores detection mAP
        ranks by, npvlm.evaluate). Returns a Generation, or a list of them for list inputs.
        """
        return gen.generate(self, images, prompts, max_new_tokens,
                            SamplingOptions(temperature, top_k, top_p, seed), stop, stream, logprobs)

    def explain(self, image, prompt, max_new_tokens=32, answer=None, top_k=5):
        """Why the model answers `prompt` about `image` as it does (greedy, up to max_new_tokens),
        or why it would give `answer` (forced, with <eos>): for every answer token its
        log-probability, attention on the image by layer and head, gradient with respect to the
        pixels and the logit lens with the top_k tokens per layer (npvlm/explain,
        docs/interpretability.md). One image, one prompt. -> Explanation"""
        from .explain.attribute import explain  # noqa: PLC0415 (imported when first used)
        return explain(self, image, prompt, max_new_tokens, answer, top_k)

    def __repr__(self):
        v, t = self.cfg.vision, self.cfg.text
        return (f"PaliGemma({t.model_type}, image {v.image_size}px -> {v.num_patches} tokens, "
                f"text {t.num_hidden_layers}x{t.hidden_size}, vocab {t.vocab_size}, backend {self.backend}"
                f"{', weights bf16' if self.weights == 'bf16' else ''})")


def check_token_ids(input_ids, cfg):
    """Token ids checked on the host before they go to the device (CuPy gathers wrap
    out-of-range ids silently). input_ids: a NumPy int array."""
    bad = (input_ids < 0) | ((input_ids >= cfg.text.vocab_size) & (input_ids != cfg.image_token_index))
    if bad.any():
        raise InputError(f"token ids must lie in [0, {cfg.text.vocab_size}) (or be the <image> id "
                         f"{cfg.image_token_index}); got min {int(input_ids.min())}, max {int(input_ids.max())}")


def check_pixel_values(pixel_values, cfg):
    """pixel_values must be [B, C, R, R] at the model's channels and image side (shapes only:
    no device value is read)."""
    v = cfg.vision
    expected = (v.num_channels, v.image_size, v.image_size)
    if len(pixel_values.shape) != 4 or tuple(pixel_values.shape[1:]) != expected:
        raise InputError(f"pixel_values must be [B, {', '.join(map(str, expected))}], "
                         f"got {list(pixel_values.shape)}")


def check_images(input_ids, pixel_values, image_tokens, cfg):
    """A batch's images against its prompts, on the host: each image brings N image features,
    which the <image> tokens of the prompts must match in number. input_ids: a NumPy array."""
    if pixel_values is not None:
        check_pixel_values(pixel_values, cfg)
        n_features = pixel_values.shape[0] * cfg.num_image_tokens
    elif image_tokens is not None:
        n_features = image_tokens.shape[0] * image_tokens.shape[1]
    else:
        return
    n_image = int((input_ids == cfg.image_token_index).sum())
    if n_image != n_features:
        raise InputError(f"the prompt has {n_image} <image> tokens but there are {n_features} image "
                         f"features ({cfg.num_image_tokens} per image); each row needs exactly one "
                         "image's worth of <image> tokens")


def check_model_dir(name):
    """The folder for a model argument (npvlm/loading/hub.py): "demo" names the embedded demo model (a
    local folder called demo is "./demo"), a local folder itself, "org/name" the Hugging Face
    Hub model (from the local cache, downloaded if needed)."""
    path = hub.resolve(name)
    if path == DEMO_MODEL and not (path / "config.json").is_file():
        raise ConfigError(f"{path}: the embedded demo model is missing from this installation; "
                          "reinstall npvlm or train it with `python tools/train_demo.py`")
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
    `backend` ("numpy" or "cupy"); "demo" is the embedded demo model, "org/name" a Hugging Face
    Hub model (npvlm/loading/hub.py). Weights are checked
    strictly and widened to fp32 once; weights="bf16" keeps the matrices in bfloat16 instead
    (half the memory, slower decoding; NumPy only; npvlm/loading/bf16.py). On the CPU, BLAS's
    thread count is chosen from the machine's load at the model's first computation
    (npvlm/cpu.py; NPVLM_THREADS=n fixes it)."""
    t0 = time.perf_counter()
    check_weights_option(weights, backend)
    path = check_model_dir(path)
    xp = get_backend(backend)          # fail before reading gigabytes if the backend is unusable
    if xp is np:
        cpu.on_load()              # NPVLM_THREADS checked; a look at the machine's load begins
    cfg = load_config(path)
    processor = None
    if (path / "tokenizer.model").is_file():
        processor = Processor.from_model_dir(path, cfg)
    params = load_params(path, cfg, weights)
    if xp.__name__ != "numpy":
        params = to_device(params, xp)
    return PaliGemma(cfg, params, xp, path, processor, load_s=time.perf_counter() - t0)
