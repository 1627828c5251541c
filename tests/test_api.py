"""The Python API: npvlm.load(path).generate(images, prompts, **options)."""

import numpy as np
import pytest
from PIL import Image

import npvlm
from npvlm.errors import InputError

from helpers import BACKENDS, write_random_model


@pytest.fixture(scope="module", params=BACKENDS)
def model(request, tmp_path_factory):
    folder = write_random_model(tmp_path_factory.mktemp("api") / "model", max_positions=128)
    return npvlm.load(folder, backend=request.param)


def _image(seed, shape=(30, 50, 3)):
    return np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)


def test_single_prompt_returns_text_tokens_timings(model, tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(_image(0)).save(path)
    for img in (path, str(path), Image.open(path), _image(0)):
        out = model.generate(img, "caption en", max_new_tokens=6)
        assert isinstance(out.text, str) and str(out) == out.text
        assert 1 <= len(out.tokens) <= 6 and out.finish_reason in ("eos", "length")
        assert out.text == model.tokenizer.decode(out.tokens)
        assert out.timings["prefill_s"] > 0


def test_batch_rows_equal_single_runs(model):
    images = [_image(1), _image(2, (80, 20, 3)), _image(3)]
    prompts = ["caption en", "answer en what color is the big circle on the left?", "detect square"]
    batch = model.generate(images, prompts, max_new_tokens=12)
    for img, prompt, got in zip(images, prompts, batch):
        alone = model.generate(img, prompt, max_new_tokens=12)
        assert got.tokens == alone.tokens and got.text == alone.text


def test_same_seed_same_sample(model):
    a = model.generate(_image(4), "caption en", max_new_tokens=10, temperature=1.2, top_p=0.9, seed=11)
    b = model.generate(_image(4), "caption en", max_new_tokens=10, temperature=1.2, top_p=0.9, seed=11)
    assert a.tokens == b.tokens


def test_stream_pieces_add_up_to_the_text(model):
    pieces = []
    out = model.generate(_image(5), "caption en", max_new_tokens=16, stream=pieces.append)
    assert "".join(pieces) == out.text


def test_stop_string_cuts_the_text(model):
    full = model.generate(_image(6), "caption en", max_new_tokens=16)
    # the fixture model is seeded, so this holds or fails the same way on every run
    assert len(full.text) >= 3, f"the fixture model answered {full.text!r}: too short to cut"
    stop = full.text[1:3]
    cut = model.generate(_image(6), "caption en", max_new_tokens=16, stop=[stop])
    assert cut.text == full.text[:full.text.find(stop)] and cut.finish_reason == "stop"


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=500), "positions"),
    (dict(temperature=-1.0), "temperature"), (dict(top_p=2.0), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(stop=[""]), "stop"),
])
def test_bad_options_raise_input_error(model, kwargs, message):
    with pytest.raises(InputError, match=message):
        model.generate(_image(7), "caption en", **kwargs)


def test_image_prompt_count_mismatch(model):
    with pytest.raises(InputError, match="1 image"):
        model.generate([_image(8)], ["a", "b"])


def test_empty_prompt_is_allowed(model):
    assert isinstance(model.generate(_image(9), "", max_new_tokens=3).text, str)


def test_stream_never_shows_a_stop_string(model):
    full = model.generate(_image(10), "caption en", max_new_tokens=20)
    assert len(full.text) >= 4, f"the fixture model answered {full.text!r}: too short to cut"
    stop = full.text[2:4]
    pieces = []
    out = model.generate(_image(10), "caption en", max_new_tokens=20, stop=stop, stream=pieces.append)
    assert "".join(pieces) == out.text == full.text[:full.text.find(stop)]


def test_one_prompt_is_asked_of_every_image(model):
    images = [_image(11), _image(12)]
    together = model.generate(images, "caption en", max_new_tokens=8)
    assert isinstance(together, list) and len(together) == 2
    for img, got in zip(images, together):
        assert got.tokens == model.generate(img, "caption en", max_new_tokens=8).tokens


def test_sampled_rows_equal_single_runs(model):
    """Each row samples from its own generator (same seed): what it samples alone."""
    images, prompts = [_image(13), _image(14)], ["caption en", "answer en what is this?"]
    kw = dict(max_new_tokens=10, temperature=1.3, top_k=20, seed=5)
    batch = model.generate(images, prompts, **kw)
    for img, prompt, got in zip(images, prompts, batch):
        assert got.tokens == model.generate(img, prompt, **kw).tokens


def test_prefill_takes_the_processor_dict(model):
    inputs = model.processor([_image(15)], ["caption en"])
    from_dict = model.prefill(inputs)
    one_by_one = model.prefill(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
    np.testing.assert_array_equal(npvlm.backend.to_host(from_dict), npvlm.backend.to_host(one_by_one))


def test_bad_token_ids_are_refused_on_the_host(model):
    inputs = model.processor([_image(16)], ["caption en"])
    ids = inputs["input_ids"].copy()
    ids[0, -1] = model.cfg.text.vocab_size + 5
    with pytest.raises(InputError, match="token ids must lie in"):
        model.prefill(ids, inputs["attention_mask"], inputs["pixel_values"])


def test_images_that_do_not_fit_the_prompts_are_refused_on_the_host(model):
    """Checked before anything moves to the device: the pixels' shape, and one image's worth of
    <image> tokens per image (the math itself reads no device value to check them)."""
    inputs = model.processor([_image(17)], ["caption en"])
    ids, mask, pixels = inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]
    with pytest.raises(InputError, match=r"pixel_values must be \[B, 3, "):
        model.prefill(ids, mask, pixels[:, :, :-1])
    with pytest.raises(InputError, match=r"pixel_values must be \[B, 3, "):
        model.encode_images(pixels[0])
    with pytest.raises(InputError, match="the prompt has .* <image> tokens but there are"):
        model.prefill(ids, mask, np.concatenate([pixels, pixels]))
    with pytest.raises(InputError, match="the prompt has .* <image> tokens but there are"):
        model.prefill(ids[:, 1:], mask[:, 1:], pixels)
