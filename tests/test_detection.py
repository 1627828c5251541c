"""Detection text parsing: boxes, order, divisors, malformed records, round trips, fuzzing."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npvlm.tasks.detection import encode_box, parse_detections


def test_two_objects_in_y_x_order():
    text = "<loc0256><loc0512><loc0768><loc1000> cat ; <loc0000><loc0000><loc0512><loc0256> dog"
    r = parse_detections(text, width=200, height=100)
    assert not r.problems
    cat, dog = r.objects
    assert cat.label == "cat" and cat.bins == (256, 512, 768, 1000)
    assert cat.box == (25.0, 100.0, 75.0, 1000 / 1024 * 200)      # y scaled by height, x by width
    assert cat.xyxy == (100.0, 25.0, 1000 / 1024 * 200, 75.0)
    assert dog.box == (0.0, 0.0, 50.0, 50.0)


def test_divisor_option():
    text = "<loc0000><loc0000><loc1023><loc1023> thing"
    assert parse_detections(text, 1023, 1023, divisor=1023).objects[0].box == (0, 0, 1023, 1023)
    assert parse_detections(text, 1024, 1024).objects[0].box == (0, 0, 1023, 1023)
    with pytest.raises(ValueError):
        parse_detections(text, 10, 10, divisor=1000)


def test_segmentation_record():
    segs = "".join(f"<seg{i:03d}>" for i in range(16))
    r = parse_detections(f"<loc0100><loc0100><loc0200><loc0200>{segs} cat", 100, 100)
    assert r.objects[0].seg == tuple(range(16)) and r.objects[0].label == "cat"


@pytest.mark.parametrize("text, reason", [
    ("<loc0100><loc0100><loc0200> cat", "3 <loc> tokens"),
    ("<loc0100><loc0100><loc0200><loc0200><loc0300> cat", "5 <loc> tokens"),
    ("<loc0100><loc0100><loc0200><loc0200><seg001><seg002> cat", "2 <seg> tokens"),
    ("<loc0100><loc0100><loc1024><loc0200> cat", "outside 0..1023"),
    ("<loc0200><loc0100><loc0200><loc0300> cat", "empty box"),
    ("<loc0100><loc0300><loc0200><loc0300> cat", "empty box"),
    ("<loc0100><loc0100><loc0200><loc0200>", "no label"),
    ("just words", "no <loc> tokens"),
    ("cat <loc0100><loc0100><loc0200><loc0200> dog", "before a location token"),
])
def test_malformed_records_are_reported(text, reason):
    r = parse_detections(f"<loc0000><loc0000><loc0010><loc0010> ok ; {text}", 100, 100)
    assert [o.label for o in r.objects] == ["ok"]
    assert len(r.problems) == 1 and reason in r.problems[0].reason and r.problems[0].text == text.strip()


def test_empty_answer():
    r = parse_detections("", 10, 10)
    assert r.objects == () and r.problems == ()


boxes = st.tuples(st.integers(1, 4000), st.integers(1, 4000)).flatmap(
    lambda hw: st.tuples(st.just(hw), st.floats(0, 0.98), st.floats(0, 0.98),
                         st.floats(0.02, 1.0), st.floats(0.02, 1.0)))


@settings(max_examples=300, deadline=None)
@given(boxes, st.sampled_from([1023, 1024]))
def test_encode_parse_round_trip(b, divisor):
    (h, w), fy, fx, fh, fw = b
    y1, x1 = fy * h, fx * w
    y2, x2 = min(h, y1 + max(fh * (h - y1), 2 * h / 1023)), min(w, x1 + max(fw * (w - x1), 2 * w / 1023))
    text = encode_box((y1, x1, y2, x2), w, h, divisor=1023) + " thing"
    r = parse_detections(text, w, h, divisor=divisor)
    if r.problems:   # only a box under one bin tall/wide can collapse
        assert "empty box" in r.problems[0].reason
        return
    got = r.objects[0].box
    tol_y, tol_x = 1.5 * h / 1023, 1.5 * w / 1023              # rounding + the 1023/1024 choice
    assert abs(got[0] - y1) <= tol_y and abs(got[2] - y2) <= tol_y
    assert abs(got[1] - x1) <= tol_x and abs(got[3] - x2) <= tol_x


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(["<loc", "<seg", ">", ";", " ; ", "cat", " ", "<", "\n"]),
                          st.integers(0, 99999).map(lambda i: f"<loc{i:04d}>"),
                          st.integers(0, 999).map(lambda i: f"<seg{i:03d}>"),
                          st.text(max_size=5)), max_size=40))
def test_parser_never_crashes(parts):
    r = parse_detections("".join(parts), 640, 480)
    for o in r.objects:
        assert 0 <= o.box[0] < o.box[2] <= 480 and 0 <= o.box[1] < o.box[3] <= 640 and o.label

