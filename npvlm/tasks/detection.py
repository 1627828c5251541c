"""PaliGemma detection / segmentation text -> objects with boxes (docs/spec.md §13).

The model writes one record per object, records separated by ` ; `:

    <locY1><locX1><locY2><locX2>[<segA>...<segP>] label ; <loc...>... label

- Box corners come in the order **y_min, x_min, y_max, x_max** (not x first).
- Each loc value is a bin 0..1023 of the image's height (y) or width (x), in the *resized square*
  the model saw; since that square is the whole image squashed, a bin maps straight back to the
  original image: y = bin / divisor * height, x = bin / divisor * width.
- The divisor is 1024 in the public PaliGemma demo (and most tutorials), 1023 in big_vision's
  evaluator (which encodes boxes as round(v * 1023)). The two differ by less than one bin;
  `divisor` chooses, 1024 by default.
- Segment records add 16 `<segNNN>` codes (0..127) after the box: the 4x4 grid of VQ-VAE
  codebook indices of the object's mask.

Malformed records (wrong number of loc or seg tokens, values out of range, y2 <= y1 or
x2 <= x1, no label) are returned as problems with the offending text, never dropped silently and
never repaired into an invented box.
"""

import re
from dataclasses import dataclass

from ..config import NUM_LOC, NUM_SEG, SEG_CODES


@dataclass(frozen=True)
class DetectedObject:
    label: str
    box: tuple          # (y_min, x_min, y_max, x_max) in pixels of the original image, floats
    bins: tuple         # the four loc values as written
    seg: tuple = None   # 16 seg codes for a segmentation record, else None

    @property
    def xyxy(self):
        """(x_min, y_min, x_max, y_max), the order most drawing libraries want."""
        y1, x1, y2, x2 = self.box
        return (x1, y1, x2, y2)


@dataclass(frozen=True)
class ParseProblem:
    text: str           # the record as written
    reason: str


@dataclass(frozen=True)
class ParseResult:
    objects: tuple
    problems: tuple


def _records(text):
    """Split on ` ; ` separators outside tokens; a ';' in a label cannot occur (the model's labels
    have none), so every ';' separates records."""
    return [r.strip() for r in text.split(";")]


def parse_record(record, width, height, divisor=NUM_LOC):
    """One record -> DetectedObject, or ParseProblem saying what is wrong."""
    locs, segs, pos = [], [], 0
    for m in re.finditer(r"<loc(\d+)>|<seg(\d+)>", record):
        if record[pos:m.start()].strip():
            return ParseProblem(record, f"text {record[pos:m.start()].strip()!r} before a location token")
        if m.group(1) is not None:
            if segs:
                return ParseProblem(record, "a <loc> token after <seg> tokens")
            locs.append(int(m.group(1)))
        else:
            segs.append(int(m.group(2)))
        pos = m.end()
    label = record[pos:].strip()
    if not locs:
        return ParseProblem(record, "no <loc> tokens")
    if len(locs) != 4:
        return ParseProblem(record, f"{len(locs)} <loc> tokens (a box needs 4)")
    if segs and len(segs) != SEG_CODES:
        return ParseProblem(record, f"{len(segs)} <seg> tokens (a mask needs {SEG_CODES})")
    if any(not 0 <= v < NUM_LOC for v in locs):
        return ParseProblem(record, f"a <loc> value outside 0..{NUM_LOC - 1}")
    if any(not 0 <= v < NUM_SEG for v in segs):
        return ParseProblem(record, f"a <seg> value outside 0..{NUM_SEG - 1}")
    y1, x1, y2, x2 = locs
    if y2 <= y1 or x2 <= x1:
        return ParseProblem(record, f"empty box (y {y1}..{y2}, x {x1}..{x2}: needs y2 > y1 and x2 > x1)")
    if not label:
        return ParseProblem(record, "no label after the box")
    box = (y1 / divisor * height, x1 / divisor * width, y2 / divisor * height, x2 / divisor * width)
    return DetectedObject(label, box, tuple(locs), tuple(segs) if segs else None)


def parse_detections(text, width, height, divisor=NUM_LOC):
    """Generated text -> ParseResult(objects, problems). width, height: the original image's
    size in pixels. An empty answer (nothing found) gives no objects and no problems."""
    if divisor not in (1023, 1024):
        raise ValueError(f"divisor must be 1024 (public demo) or 1023 (big_vision), got {divisor!r}")
    objects, problems = [], []
    for record in _records(text):
        if not record:
            continue
        r = parse_record(record, width, height, divisor)
        (objects if isinstance(r, DetectedObject) else problems).append(r)
    return ParseResult(tuple(objects), tuple(problems))


def encode_box(box, width, height, divisor=NUM_LOC - 1):
    """(y_min, x_min, y_max, x_max) pixels -> `<locY1><locX1><locY2><locX2>`, as big_vision
    encodes training targets: round(v / size * 1023), clipped to 0..1023."""
    sizes = (height, width, height, width)
    bins = [min(NUM_LOC - 1, max(0, round(v / s * divisor))) for v, s in zip(box, sizes)]
    return "".join(f"<loc{b:04d}>" for b in bins)
