"""Tokenizer + processor: ids, masks and text equal HF 5.24 `PaliGemmaProcessor` / `GemmaTokenizer`.

The fixture `tests/fixtures/tokenizer/` is a tiny SentencePiece model with Gemma's id layout
(tests/make_tokenizer.py) and HF's own conversion of it, `tokenizer.json`. The HF side is built
from the same folder; the tests skip when transformers is not installed.
"""

import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from npvlm.config import config_from_dict
from npvlm.errors import CheckpointError, InputError
from npvlm.inputs.processor import Processor
from npvlm.inputs.tokenizer import Tokenizer

from helpers import one_line_error

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tokenizer"
MODEL = FIXTURE / "tokenizer.model"
REGENERATE = "pip install protobuf && python tests/make_tokenizer.py"
IMAGE_SIZE, PATCH = 28, 14
N_IMG = (IMAGE_SIZE // PATCH) ** 2   # 4 image tokens

PROMPTS = [
    "", "caption en", "answer en what color is the circle?", "describe ünïcödé 日本 🙂",
    "ocr 12345 3.14", "caption en\n", "  leading spaces", "answer en  how   many shapes?",
    "<image>caption en", "<image> answer en what color is the square?", "hi <image>there",
    "detect circle ; square ; red triangle", "segment yellow star", "x<bos>y<eos>z<pad>",
    "tab\there\r\n", "<loc0007><seg127> keep", "café naïve 🙂🙂", "Zebra QUIZ xyz",
]
SUFFIXES = [
    ("caption en", "a red circle and a blue square."),
    ("answer en how many shapes are there?", "3"),
    ("detect circle ; square", "<loc0100><loc0200><loc0300><loc0400> circle ; "
                               "<loc0010><loc0020><loc0030><loc0040> square"),
    ("segment star", "<loc0001><loc0002><loc0003><loc0004> <seg000><seg127> star"),
    ("", ""),
    ("describe en", "ünïcödé 日本 🙂\nline two  "),
    ("<image>caption en", " leading space"),
]


def sentencepiece_size():
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=str(MODEL)).get_piece_size()


def tiny_cfg(image_token_index, eos_token_id=1):
    return config_from_dict({
        "model_type": "paligemma", "image_token_index": image_token_index,
        "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": eos_token_id,
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "image_size": IMAGE_SIZE, "patch_size": PATCH},
        "text_config": {"model_type": "gemma", "vocab_size": 1856, "hidden_size": 32,
                        "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                        "num_key_value_heads": 1, "head_dim": 16},
    })


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(MODEL, sentencepiece_size())


@pytest.fixture(scope="module")
def ours(tok):
    return Processor(tok, tiny_cfg(tok.image_token_id))


@pytest.fixture(scope="module")
def hf():
    """HF PaliGemmaProcessor on the fixture tokenizer, left padding, N_IMG image tokens."""
    transformers = pytest.importorskip("transformers", reason="transformers not installed: "
                                       "pip install -e '.[reference]'")
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    if not (FIXTURE / "tokenizer.json").is_file():
        pytest.fail(f"{FIXTURE}/tokenizer.json missing (HF's conversion); regenerate: {REGENERATE}")
    transformers.logging.set_verbosity_error()   # the "passing both text and images" warning
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(FIXTURE))
    tokenizer.padding_side = "left"
    image_processor = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    image_processor.image_seq_length = N_IMG
    return transformers.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)


def blank(n=1):
    imgs = [Image.new("RGB", (9, 7), (10 * i, 20, 30)) for i in range(n)]
    return imgs[0] if n == 1 else imgs


# ---- layout ---------------------------------------------------------------------------------

def test_fixture_layout(tok):
    n = tok.piece_size
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.sp.unk_id()) == (0, 1, 2, 3)
    assert [tok.sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
    assert tok.image_token_id == n and tok.vocab_size == n + 1
    # as in the real vocabulary, loc/seg are the last 1152 pieces (loc0000 at 256000 there)
    assert [tok.loc_id(i) for i in range(1024)] == list(range(n - 1152, n - 128))
    assert [tok.seg_id(i) for i in range(128)] == list(range(n - 128, n))
    for text, token_id in [("<loc0000>", tok.loc_id(0)), ("<loc1023>", tok.loc_id(1023)),
                           ("<seg000>", tok.seg_id(0)), ("<seg127>", tok.seg_id(127))]:
        assert tok.encode(text) == [token_id]
    assert len(tok.encode("\n")) == 1 and tok.sp.is_byte(tok.encode("🙂")[0])
    with pytest.raises(InputError):
        tok.loc_id(1024)
    with pytest.raises(InputError):
        tok.seg_id(-1)
    print(f"piece_size {n}, first loc {tok.loc_id(0)}, first seg {tok.seg_id(0)}")


def test_hf_reads_the_same_vocabulary(tok, hf):
    """A stale tokenizer.json (the model retrained, HF's conversion not redone) fails here."""
    t = hf.tokenizer
    n = tok.piece_size
    assert t.convert_ids_to_tokens(list(range(n))) == [tok.sp.id_to_piece(i) for i in range(n)], \
        f"tokenizer.json does not match tokenizer.model; regenerate: {REGENERATE}"
    assert hf.image_token_id == tok.image_token_id == len(t) - 1
    every_id = list(range(n + 3))   # the pieces, <image>, and two ids past HF's vocabulary
    assert [tok.piece(i) for i in every_id] == t.convert_ids_to_tokens(every_id)
    assert t("<loc0007>", add_special_tokens=False).input_ids == [tok.loc_id(7)]
    assert t("\n", add_special_tokens=False).input_ids == tok.encode("\n")
    assert (t.pad_token_id, t.eos_token_id, t.bos_token_id) == (tok.pad_id, tok.eos_id, tok.bos_id)


# ---- text -> ids ----------------------------------------------------------------------------

def _hf_row(hf, prompt, suffix=None):
    out = hf(images=blank(), text=prompt, suffix=suffix, return_tensors="np")
    keys = ("input_ids", "attention_mask", "token_type_ids") + (("labels",) if suffix is not None else ())
    return {k: out[k][0].tolist() for k in keys}


@pytest.mark.parametrize("prompt", PROMPTS)
def test_prompt_ids_equal_hf(ours, hf, prompt):
    got = ours(blank(), prompt)
    want = _hf_row(hf, prompt)
    for key in want:
        assert got[key][0].tolist() == want[key], key
    assert got["input_ids"][0].tolist().count(ours.tokenizer.image_token_id) == N_IMG


@pytest.mark.parametrize("prompt,suffix", SUFFIXES)
def test_training_inputs_with_suffix_equal_hf(ours, hf, prompt, suffix):
    got = ours(blank(), prompt, suffixes=suffix)
    want = _hf_row(hf, prompt, suffix)
    for key in want:
        assert got[key][0].tolist() == want[key], key
    ids, types = got["input_ids"][0], got["token_type_ids"][0]
    assert ids[-1] == ours.tokenizer.eos_id and types[-1] == 1


def test_batch_left_padding_equals_hf(ours, hf):
    prompts = ["caption en", "answer en what color is the circle?", "", "ocr 12345 3.14"]
    got = ours(blank(4), prompts)
    want = hf(images=blank(4), text=prompts, padding="longest", return_tensors="np")
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        assert got[key].dtype == np.int64
    assert got["input_ids"][2, 0] == ours.tokenizer.pad_id and got["attention_mask"][2, 0] == 0
    np.testing.assert_array_equal(got["pixel_values"], want["pixel_values"])
    assert got["pixel_values"].dtype == np.float32 and got["pixel_values"].shape == (4, 3, 28, 28)


def test_batch_with_suffixes_equals_hf(ours, hf):
    prompts = ["caption en", "detect circle"]
    suffixes = ["a red circle, a blue square and a green triangle", "<loc0001><loc0002><loc0003><loc0004> circle"]
    got = ours(blank(2), prompts, suffixes)
    want = hf(images=blank(2), text=prompts, suffix=suffixes, padding="longest", return_tensors="np")
    for key in ("input_ids", "attention_mask", "token_type_ids", "labels"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert (got["attention_mask"] == 0).any(), "the two rows should differ in length (padding)"


FRAGMENTS = list("abcdeéüñ ABCZ\n\t\r.,;?!0123456789<>/_-") + [
    "<bos>", "<eos>", "<pad>", "<unk>", "<mask>", "<image>", "<loc0001>", "<seg127>", "▁", "日本",
    "🙂", "\x00", "\u3000", "\u00a0", "e\u0301", "ﬁ", "<loc", "<0x41>", "  ", "\n\n", " the",
    " circle", "caption", "answer en", " red", "square", "what", "xagon", "Rectangle"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=14))
def test_encode_equals_hf_tokenizer(tok, hf, parts):
    text = "".join(parts)
    assert tok.encode(text) == hf.tokenizer(text, add_special_tokens=False).input_ids


# ---- ids -> text ----------------------------------------------------------------------------

def _random_ids(rng, tok, k):
    n = tok.piece_size
    utf8 = tok.encode("é日本🙂")                                # byte pieces of whole characters
    pools = [lambda: rng.randrange(n + 1),                   # anything, <image> included
             lambda: rng.randrange(7, 263),                  # byte pieces
             lambda: rng.randrange(5),                       # pad eos bos unk mask
             lambda: rng.randrange(n - 1152, n),             # loc / seg
             lambda: rng.choice(utf8)]
    return [rng.choice(pools)() for _ in range(k)]


def test_decode_equals_hf(tok, hf):
    rng = random.Random(0)
    for _ in range(1500):
        ids = _random_ids(rng, tok, rng.randrange(14))
        assert tok.decode(ids) == hf.tokenizer.decode(ids, skip_special_tokens=True), ids
    text = "answer en ünï 日本 🙂 <loc0001>\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(np.array(tok.encode("a red circle"), dtype=np.int64)) == "a red circle"


def test_decode_byte_runs_follow_hf_not_sentencepiece(tok, hf):
    """HF: a byte run that is not valid UTF-8 is all U+FFFD; SentencePiece keeps valid bytes."""
    a, e6 = tok.sp.piece_to_id("<0x41>"), tok.sp.piece_to_id("<0xE6>")
    assert tok.decode([a, e6]) == hf.tokenizer.decode([a, e6]) == "\ufffd\ufffd"
    assert tok.sp.decode([a, e6]) == "A\ufffd"
    eos = tok.eos_id   # a special id between bytes is dropped first, so the run joins up
    japanese = tok.encode("日")
    assert tok.decode(japanese[:1] + [eos] + japanese[1:]) == "日"


def test_stream_decoder_equals_decode(tok):
    rng = random.Random(1)
    for _ in range(500):
        ids = _random_ids(rng, tok, rng.randrange(20))
        stream = tok.stream_decoder()
        pieces = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == tok.decode(ids), ids
    stream = tok.stream_decoder()
    emoji = tok.encode("🙂")                  # four byte pieces: nothing until the run ends
    assert [stream.push(i) for i in emoji] == ["", "", "", ""]
    assert stream.push(tok.encode("!")[0]) == "🙂!"
    assert stream.push(tok.eos_id) == "" and stream.flush() == ""


def test_decode_rejects_negative_ids(tok):
    with pytest.raises(InputError, match="negative"):
        tok.decode([5, -1])
    with pytest.raises(InputError, match="negative"):
        tok.piece(-1)


# ---- errors ---------------------------------------------------------------------------------

def test_tokenizer_file_errors(tmp_path):
    n = sentencepiece_size()
    one_line_error(CheckpointError, lambda: Tokenizer.from_file(tmp_path / "nope.model", n),
                               "nope.model", "not found")
    one_line_error(CheckpointError, lambda: Tokenizer.from_file(tmp_path, n), str(tmp_path))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    one_line_error(CheckpointError, lambda: Tokenizer.from_file(junk, n), "junk.model",
                               "not a SentencePiece model")
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    one_line_error(CheckpointError, lambda: Tokenizer.from_file(empty, n), "empty.model",
                               "not a SentencePiece model")
    one_line_error(CheckpointError, lambda: Tokenizer.from_file(MODEL, 257152), str(n), "257152")


def test_tokenizer_without_loc_tokens_is_refused(tmp_path):
    import io
    import os

    import sentencepiece as spm
    model = io.BytesIO()
    with open(os.devnull, "w") as devnull:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(["a red circle", "a blue square"] * 20), model_writer=model,
            logstream=devnull, model_type="bpe", vocab_size=40, hard_vocab_limit=False,
            pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
            bos_piece="<bos>", unk_piece="<unk>")
    path = tmp_path / "tokenizer.model"
    path.write_bytes(model.getvalue())
    n = spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()
    one_line_error(CheckpointError, lambda: Tokenizer.from_file(path, n), "<loc0000>", "single piece")


def test_processor_errors(ours, tmp_path, tok):
    with pytest.raises(InputError, match="2 image"):
        ours(blank(2), ["caption en"])
    with pytest.raises(InputError, match="suffix"):
        ours(blank(2), ["a", "b"], suffixes=["x"])
    with pytest.raises(InputError, match="one image per prompt"):
        ours(blank(), "<image><image>caption en")
    with pytest.raises(InputError):
        ours(blank(), 42)
    msg = one_line_error(CheckpointError, lambda: Processor.from_model_dir(tmp_path, ours.cfg),
                                     "tokenizer.model", "file not found")
    assert msg.startswith(str(tmp_path / "tokenizer.model"))
    (tmp_path / "tokenizer.model").write_bytes(MODEL.read_bytes())
    assert Processor.from_model_dir(tmp_path, ours.cfg).tokenizer.piece_size == tok.piece_size
    one_line_error(CheckpointError, lambda: Processor(tok, tiny_cfg(tok.image_token_id, 7)), "eos", "7")
