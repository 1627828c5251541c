r"""Train the tiny test tokenizer: a SentencePiece model with Gemma's / PaliGemma's id layout.

    python tests/make_tokenizer.py                 # writes tests/fixtures/tokenizer/
    python tests/make_tokenizer.py --out /tmp/tok  # somewhere else

Needs only `sentencepiece`. The output is deterministic: the corpus is generated from a fixed
seed and trained single-threaded, so rerunning gives a byte-identical `tokenizer.model`.

Layout (compare the real PaliGemma vocabulary, docs/spec.md §5.1):

    id 0 <pad>, 1 <eos>, 2 <bos>, 3 <unk>, 4 <mask>     control pieces, as in Gemma
    "\n", "\n\n" (user-defined, like Gemma's newline pieces), 256 byte pieces <0x00>..<0xFF>,
    a few hundred BPE pieces learned from a synthetic "shapes world" corpus,
    then <loc0000>..<loc1023>, <seg000>..<seg127> (user-defined), the LAST 1152 pieces,
    so that, as in the real model (loc at 256000, `<image>` at 257152), the first loc id is
    piece_size - 1152 and Hugging Face's appended `<image>` lands at id == piece_size.

`<mask>` (id 4 in Gemma too) must be in the model: HF's `GemmaTokenizer` has `mask_token="<mask>"`
by default and would otherwise append it at id piece_size, pushing `<image>` to piece_size + 1.

SentencePiece's trainer puts user-defined symbols right after the control pieces; we move the
loc/seg pieces to the end by reordering the serialized model's `pieces` (field 1 of ModelProto)
with a minimal protobuf wire-format walk, so no `protobuf` install is needed.

Hugging Face (transformers 5.x) can only *convert* a `.model` file when `protobuf` is installed,
which npvlm's dependencies do not include. So when `transformers` and `protobuf` are importable,
this script also writes HF's own conversion, `tokenizer.json`, next to the model, and the tests
load HF from it (as real checkpoints ship one). Without them an existing `tokenizer.json` is kept
only if `tokenizer.model` came out unchanged (training is deterministic), else it is removed.
`tokenizer_config.json` names `GemmaTokenizer`, so `AutoTokenizer.from_pretrained(dir)` builds
the same class PaliGemma checkpoints use.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
from pathlib import Path

import sentencepiece as spm

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "tokenizer"

LOC_TOKENS = [f"<loc{i:04d}>" for i in range(1024)]   # big_vision get_extra_tokens("loc")
SEG_TOKENS = [f"<seg{i:03d}>" for i in range(128)]    # big_vision get_extra_tokens("seg")
NEWLINE_TOKENS = ["\n", "\n\n"]                        # Gemma has "\n" (id 108), "\n\n", ...
VOCAB_SIZE = 1800  # 5 control + 2 newline + 1152 loc/seg + 256 bytes + ~385 learned pieces

# ------------------------------------------------------------------------------------------
# corpus: a synthetic shapes world (captions, VQA, detection, segmentation, OCR-ish digits)
# ------------------------------------------------------------------------------------------
COLORS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple", "gray"]
SHAPES = ["circle", "square", "triangle", "star", "rectangle", "ellipse", "hexagon"]
SIZES = ["small", "large", "big", "tiny"]
PLACES = ["left", "right", "top", "bottom", "center", "middle", "corner"]
LANGS = ["en", "es", "fr", "de"]
FILLER = ("The picture shows an image of some shapes on a plain background. There is one shape "
          "next to another shape, and they are drawn with thick lines. How many shapes are there? "
          "What color is the shape in the corner? Which one is bigger: the first or the second? "
          "Yes, no, maybe. This is a test sentence; it has commas, colons: and (brackets). "
          "Numbers like 12, 345 and 3.14 appear, also 100% and #1! Don't forget quotes \"like "
          "this\" or 'that'. A dog, a cat and a cow sit on a bench near a house, a tree and a car. "
          "Un café über alles, el niño: déjà vu, naïve façade.")


def _shape_phrase(rng):
    return f"{rng.choice(['a', 'the', 'one'])} {rng.choice(SIZES + [''])} {rng.choice(COLORS)} " \
           f"{rng.choice(SHAPES)}".replace("  ", " ")


def _loc_box(rng):
    y0, x0 = rng.randrange(0, 900), rng.randrange(0, 900)
    y1, x1 = y0 + rng.randrange(10, 124), x0 + rng.randrange(10, 124)
    return "".join(f"<loc{v:04d}>" for v in (y0, x0, y1, x1))


def corpus_lines(n=3000, seed=0):
    """Deterministic training sentences (str, some with an embedded newline)."""
    rng = random.Random(seed)
    lines = [s.strip() + "." for s in FILLER.split(".") if s.strip()]
    for _ in range(n):
        k = rng.randrange(8)
        lang = rng.choice(LANGS)
        if k == 0:
            lines.append(f"caption {lang}\n{_shape_phrase(rng)} and {_shape_phrase(rng)}.")
        elif k == 1:
            lines.append(f"answer {lang} what color is the {rng.choice(SHAPES)}?\n"
                         f"{rng.choice(COLORS)}")
        elif k == 2:
            lines.append(f"answer {lang} how many shapes are there?\n{rng.randrange(0, 20)}")
        elif k == 3:
            objs = rng.sample(SHAPES, rng.randrange(1, 4))
            lines.append(f"detect {' ; '.join(objs)}\n" + " ; ".join(
                f"{_loc_box(rng)} {o}" for o in objs))
        elif k == 4:
            shape = rng.choice(SHAPES)
            segs = "".join(f"<seg{rng.randrange(128):03d}>" for _ in range(16))
            lines.append(f"segment {shape}\n{_loc_box(rng)} {segs} {shape}")
        elif k == 5:
            lines.append(f"ocr\n{rng.randrange(10 ** 6)} {rng.randrange(100)}.{rng.randrange(100)}"
                         f" - {rng.choice(COLORS).upper()} {rng.choice(SHAPES).capitalize()}!")
        elif k == 6:
            lines.append(f"describe {lang}\nThere is {_shape_phrase(rng)} at the "
                         f"{rng.choice(PLACES)}, and {_shape_phrase(rng)} is on the "
                         f"{rng.choice(PLACES)}.")
        elif k == 7 and rng.random() < 0.3:
            indent = " " * rng.randrange(2, 6)   # whitespace runs: "▁▁" pieces, as Gemma has
            lines.append(f"{indent}{_shape_phrase(rng)}  is  {rng.choice(PLACES)}.{indent}")
        else:
            lines.append(f"question {lang} {rng.choice(COLORS)}\nIs the {rng.choice(SHAPES)} "
                         f"{rng.choice(COLORS)}? Yes, it's {rng.choice(COLORS)}; no: "
                         f"\"{rng.choice(SHAPES)}\" ({rng.randrange(10)}).")
    return lines


# ------------------------------------------------------------------------------------------
# training and the piece reorder
# ------------------------------------------------------------------------------------------
def train_model_bytes():
    """Train with a Gemma-like recipe (BPE, byte fallback, identity normalizer, no dummy prefix,
    split digits; the settings HF's converter honours, huggingface/transformers#30824); returns
    the serialized model (bytes)."""
    model = io.BytesIO()
    with open(os.devnull, "w") as devnull:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus_lines()), model_writer=model, logstream=devnull,
            model_type="bpe", vocab_size=VOCAB_SIZE, hard_vocab_limit=False,
            byte_fallback=True, character_coverage=1.0,
            pad_id=0, eos_id=1, bos_id=2, unk_id=3,
            pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
            control_symbols=["<mask>"],
            user_defined_symbols=NEWLINE_TOKENS + LOC_TOKENS + SEG_TOKENS,
            normalization_rule_name="identity", add_dummy_prefix=False,
            remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
            num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
            max_sentence_length=4096)
    return model.getvalue()


def _read_varint(buf, i):
    value, shift = 0, 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _top_level_fields(buf):
    """Split a protobuf message into (field_number, raw bytes of the whole field) in order."""
    fields, i = [], 0
    while i < len(buf):
        start = i
        key, i = _read_varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, i = _read_varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 2:
            n, i = _read_varint(buf, i)
            i += n
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
        fields.append((field, buf[start:i]))
    return fields


def move_pieces_to_end(model_bytes, pieces_to_move):
    """Reorder ModelProto.pieces (field 1) so that `pieces_to_move` come last, in their order.

    SentencePiece ids are positions in this list; special ids (pad/eos/bos/unk at 0..3) stay.
    """
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    fields = _top_level_fields(model_bytes)
    pieces = [raw for field, raw in fields if field == 1]
    assert len(pieces) == sp.get_piece_size()
    index = {sp.id_to_piece(i): i for i in range(len(pieces))}
    moved = [index[p] for p in pieces_to_move]
    moved_set = set(moved)
    kept = [raw for i, raw in enumerate(pieces) if i not in moved_set]
    order = kept + [pieces[i] for i in moved]
    others = b"".join(raw for field, raw in fields if field != 1)
    return b"".join(order) + others


# ------------------------------------------------------------------------------------------
# checks, HF files, main
# ------------------------------------------------------------------------------------------
def check_layout(sp):
    """Assert the Gemma-like layout; return (piece_size, first loc id, first seg id)."""
    n = sp.get_piece_size()
    assert (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert [sp.id_to_piece(i) for i in range(5)] == ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    first_loc, first_seg = n - 1152, n - 128
    assert [sp.id_to_piece(first_loc + i) for i in range(1024)] == LOC_TOKENS
    assert [sp.id_to_piece(first_seg + i) for i in range(128)] == SEG_TOKENS
    for tok in LOC_TOKENS + SEG_TOKENS + NEWLINE_TOKENS:
        assert sp.encode(tok) == [sp.piece_to_id(tok)], tok
    text = "caption en\n  answer 12345 ünï 日本 🙂 <loc0007><seg127>\n\n"
    assert sp.decode(sp.encode(text)) == text
    assert sp.encode("12") == [sp.piece_to_id("1"), sp.piece_to_id("2")]  # split_digits
    return n, first_loc, first_seg


TOKENIZER_CONFIG = {
    # what transformers 5.x needs to build the class PaliGemma checkpoints use; the special tokens
    # are GemmaTokenizer's defaults, written out so the file says what the ids mean
    "tokenizer_class": "GemmaTokenizer",
    "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
    "mask_token": "<mask>",
    "add_bos_token": True, "add_eos_token": False,
    "padding_side": "left",
    "clean_up_tokenization_spaces": False,
    "model_max_length": 1000000,
}


def write_hf_tokenizer_json(out):
    """Let transformers convert tokenizer.model into tokenizer.json; False if it cannot."""
    try:
        import google.protobuf  # noqa: F401  (HF's SentencePiece converter needs it)
        from transformers import AutoTokenizer
    except ImportError:
        return False
    tok = AutoTokenizer.from_pretrained(str(out))
    tok.backend_tokenizer.save(str(out / "tokenizer.json"), pretty=False)
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    model = move_pieces_to_end(train_model_bytes(), LOC_TOKENS + SEG_TOKENS)
    sp = spm.SentencePieceProcessor(model_proto=model)
    n, first_loc, first_seg = check_layout(sp)
    model_path = out / "tokenizer.model"
    unchanged = model_path.is_file() and model_path.read_bytes() == model
    model_path.write_bytes(model)
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    hf = write_hf_tokenizer_json(out)
    if not hf and not unchanged:
        (out / "tokenizer.json").unlink(missing_ok=True)   # it would describe the old model

    n_bytes = sum(sp.is_byte(i) for i in range(n))
    print(f"wrote {out}/tokenizer.model ({len(model)} bytes)")
    print(f"piece_size {n}  (=> <image> id {n})  first loc id {first_loc}  first seg id {first_seg}")
    print(f"{n_bytes} byte pieces, {first_loc - n_bytes - 7} learned pieces, "
          f"'\\n' = {sp.piece_to_id(chr(10))}")
    if hf:
        print(f"wrote {out}/tokenizer.json (transformers' own conversion)")
    elif unchanged and (out / "tokenizer.json").is_file():
        print("note: transformers + protobuf not importable; tokenizer.model is unchanged, so the "
              "existing tokenizer.json still matches it")
    else:
        print("note: transformers + protobuf not importable, so tokenizer.json was not written; "
              "the HF parity tests need it (pip install protobuf, then rerun)")


if __name__ == "__main__":
    main()
