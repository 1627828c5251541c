"""PaliGemma's tokenizer: the Gemma SentencePiece model, made to give Hugging Face's ids.

Text -> ids follows transformers 5.24 `PaliGemmaProcessor` + `GemmaTokenizer`; ids -> text follows
`tokenizer.decode(ids, skip_special_tokens=True)`. The SentencePiece model already holds every
id but one (docs/spec.md §5.1):

    <pad> 0, <eos> 1, <bos> 2, <unk> 3   control pieces (ids come from the model, not from here)
    <loc0000>..<loc1023>, <seg000>..<seg127>   user-defined pieces (256000.. in the real model)
    <image> = piece_size                  appended by HF (257152 in the real model)

Where HF and plain SentencePiece differ, we do what HF does (tests/test_tokenizer.py checks it):

- HF matches its *special* tokens (the control pieces, `<unk>`, `<image>`) anywhere in the text:
  "a<bos>b" gives the bos id, where `sp.encode` would spell out "<", "b", "o", ... So the text
  is cut at those strings first and SentencePiece encodes the pieces in between.
  (User-defined pieces such as `<loc0007>` are matched by SentencePiece itself.)
- Decoding drops special ids (control pieces, `<unk>`, `<image>`, any id past the vocabulary)
  and keeps `<locNNNN>`/`<segNNN>`. A run of byte-fallback pieces (`<0xE6><0x97><0xA5>`) that
  is not valid UTF-8 becomes one U+FFFD *per byte*, valid bytes included: HF's `ByteFallback`
  decoder does that, while `sp.decode` keeps the valid bytes (`<0x41><0xE6>`: HF
  "\\ufffd\\ufffd", SentencePiece "A\\ufffd").

Everything here runs on the host; ids are plain Python ints.
"""

import re
from pathlib import Path

import sentencepiece as spm

from ..config import NUM_LOC, NUM_SEG
from ..errors import CheckpointError, InputError

IMAGE_TOKEN = "<image>"                                   # HF processing_paligemma.IMAGE_TOKEN


def loc_token(i):
    """`<loc0000>`..`<loc1023>`: a box coordinate, bin i of 1024 along one image side."""
    return f"<loc{i:04d}>"


def seg_token(i):
    """`<seg000>`..`<seg127>`: one code of the segmentation mask VQ-VAE."""
    return f"<seg{i:03d}>"


def _check_utf8(text, what):
    """A str with lone surrogates (e.g. bytes decoded with surrogateescape) has no UTF-8 form."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"the {what} {text[:40]!r} is not valid UTF-8 text: it holds a lone surrogate "
                         f"{text[e.start]!r} at character {e.start}; decode the bytes as UTF-8 "
                         "first") from None


def _fffd_or_text(run):
    """HF `decoders.ByteFallback`: a byte run decodes as UTF-8, or every byte becomes U+FFFD."""
    try:
        return bytes(run).decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)


class Tokenizer:
    """The SentencePiece model plus the `<image>` id that HF appends after it.

    Build with `Tokenizer.from_file(path, image_token_id)`; `image_token_id` is the config's
    `image_token_index` and must equal the model's piece count.
    """

    def __init__(self, sp, image_token_id, source="tokenizer.model"):
        self.sp = sp
        self.source = str(source)
        self.piece_size = sp.get_piece_size()
        if image_token_id != self.piece_size:
            raise CheckpointError(
                f"{self.source}: the config's image_token_index is {image_token_id}, but the "
                f"tokenizer has {self.piece_size} pieces, so HF's appended <image> is id "
                f"{self.piece_size}; the tokenizer does not belong to this model")
        self.image_token_id = image_token_id
        for name in ("bos", "eos", "pad"):
            if getattr(sp, f"{name}_id")() < 0:
                raise CheckpointError(f"{self.source}: the SentencePiece model defines no <{name}> "
                                      "piece; PaliGemma's Gemma tokenizer has <pad> <eos> <bos>")
        for token in (loc_token(0), loc_token(NUM_LOC - 1), seg_token(0), seg_token(NUM_SEG - 1)):
            if len(sp.encode(token)) != 1:
                raise CheckpointError(f"{self.source}: {token} is not a single piece; PaliGemma needs "
                                      "the Gemma tokenizer with the 1024 <loc> and 128 <seg> tokens")
        # HF's special tokens: every control piece and <unk> (added as special tokens by HF's
        # SentencePiece conversion), plus <image>. Longest first, so the regex is leftmost-longest.
        specials = {sp.id_to_piece(i): i for i in range(self.piece_size)
                    if sp.is_control(i) or sp.is_unknown(i)}
        specials[IMAGE_TOKEN] = image_token_id
        self._special_ids = specials
        self._special_re = re.compile("|".join(
            re.escape(s) for s in sorted(specials, key=len, reverse=True)))
        self._skip = frozenset(specials.values())

    @classmethod
    def from_file(cls, path, image_token_id):
        """Load a SentencePiece `tokenizer.model`; any problem is a one-line CheckpointError."""
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"{path}: file not found")
        if not path.is_file():
            raise CheckpointError(f"{path}: not a file (a SentencePiece tokenizer.model is needed)")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
        not_sp = CheckpointError(f"{path}: not a SentencePiece model (it could not be parsed)")
        if not data:
            raise not_sp
        try:
            sp = spm.SentencePieceProcessor(model_proto=data)
        except Exception:  # sentencepiece raises RuntimeError with a multi-line parse message
            raise not_sp from None
        if sp.get_piece_size() == 0:
            raise not_sp
        return cls(sp, image_token_id, path)

    # ---- ids ----------------------------------------------------------------------------------

    @property
    def bos_id(self):
        return self.sp.bos_id()

    @property
    def eos_id(self):
        return self.sp.eos_id()

    @property
    def pad_id(self):
        return self.sp.pad_id()

    @property
    def vocab_size(self):
        """Ids the tokenizer knows: the pieces plus `<image>` (HF `len(tokenizer)`). The model's
        embedding has more rows (257216 = 257153 padded to a multiple of 64 in the real model)."""
        return self.piece_size + 1

    def loc_id(self, i):
        """Id of `<loc{i:04d}>`, i in [0, 1024)."""
        if not 0 <= i < NUM_LOC:
            raise InputError(f"loc index must be in [0, {NUM_LOC}), got {i}")
        return self.sp.piece_to_id(loc_token(i))

    def seg_id(self, i):
        """Id of `<seg{i:03d}>`, i in [0, 128)."""
        if not 0 <= i < NUM_SEG:
            raise InputError(f"seg index must be in [0, {NUM_SEG}), got {i}")
        return self.sp.piece_to_id(seg_token(i))

    # ---- text -> ids --------------------------------------------------------------------------

    def encode(self, text, num_image_tokens=1):
        """Text -> list[int] as HF's tokenizer does (no bos added): special-token strings are
        cut out first and each becomes its id (`<image>` becomes `num_image_tokens` ids);
        SentencePiece encodes the text in between."""
        if not isinstance(text, str):
            raise InputError(f"text must be a string, got {type(text).__name__}")
        ids, start = [], 0
        for m in self._special_re.finditer(text):
            ids += self._encode_plain(text[start:m.start()])
            n = num_image_tokens if m.group() == IMAGE_TOKEN else 1
            ids += [self._special_ids[m.group()]] * n
            start = m.end()
        return ids + self._encode_plain(text[start:])

    def _encode_plain(self, text):
        if not text:
            return []
        try:
            return self.sp.encode(text)
        except (UnicodeEncodeError, RuntimeError, TypeError) as e:
            raise InputError(f"cannot tokenize the text {text[:40]!r}: {e}") from None

    def prompt_ids(self, prompt, num_image_tokens, suffix=None):
        """One prompt -> (input_ids, token_type_ids), two list[int] of the same length.

        As HF 5.24 `PaliGemmaProcessor` (`prepare_inputs_layout`, then the tokenizer with
        `text_pair=suffix + eos`):
          no <image> in prompt:  <image>*N <bos> prompt "\\n"          (prompt+"\\n" tokenized together)
          "<image>" in prompt:   bos goes right after it, "\\n" at the end, <image> -> N ids
          with suffix:           ... + tokens(suffix + "<eos>")     (token type 1; the rest 0)
        One image per prompt: a prompt may hold at most one "<image>".
        """
        if not isinstance(prompt, str):
            raise InputError(f"a prompt must be a string, got {type(prompt).__name__}")
        _check_utf8(prompt, "prompt")
        n_images = prompt.count(IMAGE_TOKEN)
        if n_images > 1:
            raise InputError(f"the prompt holds {n_images} {IMAGE_TOKEN} tokens; npvlm takes one "
                             "image per prompt")
        bos = self.sp.id_to_piece(self.bos_id)
        if n_images == 0:
            text = IMAGE_TOKEN + bos + prompt + "\n"
        else:
            end = prompt.find(IMAGE_TOKEN) + len(IMAGE_TOKEN)
            text = prompt[:end] + bos + prompt[end:] + "\n"
        ids = self.encode(text, num_image_tokens)
        types = [0] * len(ids)
        if suffix is not None:
            if not isinstance(suffix, str):
                raise InputError(f"a suffix must be a string, got {type(suffix).__name__}")
            _check_utf8(suffix, "suffix")
            # HF appends the eos *string* and tokenizes suffix as text_pair; <image> in a suffix
            # is not expanded there (only `text` goes through the image-token replacement)
            tail = self.encode(suffix + self.sp.id_to_piece(self.eos_id))
            ids, types = ids + tail, types + [1] * len(tail)
        return ids, types

    # ---- ids -> text --------------------------------------------------------------------------

    def piece(self, token_id):
        """The vocabulary entry of one id, as HF's `convert_ids_to_tokens`: the SentencePiece piece
        ('▁' marks a leading space, '<0xE6>' a byte), '<image>' for the image id, and None for
        ids past the vocabulary (the padding rows of the embedding table)."""
        i = int(token_id)
        if i < 0:
            raise InputError(f"token id {i} is negative")
        if i == self.image_token_id:
            return IMAGE_TOKEN
        return self.sp.id_to_piece(i) if i < self.piece_size else None

    def _token(self, token_id):
        """("skip", None) | ("byte", int) | ("text", str) for one id, as HF's decoder sees it."""
        i = int(token_id)
        if i < 0:
            raise InputError(f"token id {i} is negative")
        if i in self._skip or i >= self.piece_size:   # HF has no token for ids past its vocab
            return "skip", None
        piece = self.sp.id_to_piece(i)
        if self.sp.is_byte(i):
            return "byte", int(piece[3:5], 16)       # "<0xE6>" -> 0xE6
        return "text", piece.replace("\u2581", " ")  # "▁" -> " " (HF decoders.Replace)

    def decode(self, ids):
        """list of ids -> str, equal to HF `decode(ids, skip_special_tokens=True)`."""
        out, run = [], bytearray()
        for token_id in ids:
            kind, value = self._token(token_id)
            if kind == "byte":
                run.append(value)
            elif kind == "text":
                if run:
                    out.append(_fffd_or_text(run))
                    run.clear()
                out.append(value)
        if run:
            out.append(_fffd_or_text(run))
        return "".join(out)

    def stream_decoder(self):
        """A StreamDecoder: feed ids one at a time, get text as soon as it is final."""
        return StreamDecoder(self)

    def __repr__(self):
        return (f"Tokenizer({self.source}, {self.piece_size} pieces, bos {self.bos_id}, "
                f"eos {self.eos_id}, pad {self.pad_id}, <image> {self.image_token_id})")


class StreamDecoder:
    """Incremental `decode` for streaming: `push(id)` returns the text that id completes,
    `flush()` the rest at the end; the pieces joined equal `tokenizer.decode(all ids)`.

    Text pieces come out at once. Byte-fallback pieces are held until the byte run ends (the next
    text piece, or `flush`), because HF decodes a run as a whole: a character split over several
    byte pieces, or a run that turns out invalid (then all of it is U+FFFD), only shows at its end.
    Special ids (eos, pad, ...) produce nothing and do not end a run, as in `decode`.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._run = bytearray()

    def push(self, token_id):
        kind, value = self.tokenizer._token(token_id)
        if kind == "byte":
            self._run.append(value)
            return ""
        if kind == "skip":
            return ""
        return self.flush() + value

    def flush(self):
        text = _fffd_or_text(self._run) if self._run else ""
        self._run.clear()
        return text
