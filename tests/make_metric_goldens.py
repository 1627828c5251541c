"""Write tests/goldens/metrics.json: inputs from tests/metric_cases.py and what the reference
implementations (tests/metric_reference.py) score them, so tests/test_metrics.py checks
npvlm.metrics without those packages installed.

    pip install -e ".[reference]"            # pycocotools, pycocoevalcap, editdistance
    git clone https://github.com/GT-Vision-Lab/VQA /tmp/VQA       # the official VQA script
    python tests/make_metric_goldens.py --vqa-eval /tmp/VQA/PythonEvaluationTools/vqaEvaluation/vqaEval.py

Java (for pycocoevalcap's PTB tokenizer) must be on PATH. Nothing here imports npvlm.metrics:
every expected value comes from a reference implementation.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import metric_cases as cases  # tests/ is sys.path[0] when this runs as a script
import metric_reference as ref

OUT = Path(__file__).resolve().parent / "goldens" / "metrics.json"
METRIC_FORMAT_VERSION = 1

# captions for the tokenizer: the cases docs/evaluation.md discusses, and typical COCO captions
PTB_CAPTIONS = [
    "A man's dog doesn't run, well-known (3.5 km)...", "Two [red] {boxes} on a table.",
    'He said "hello" -- then left!', "A cat; a dog: and a bird?", "The U.S. flag at 5:30 p.m.",
    "It's 10% off $5.99 items & more", "can't won't I'm you're they'd we'll", "A   multi\nline caption",
    "e-mail me @ home #1", "the dog's bone's", "A x-ray of a 3-year-old", "o'clock", "cannot gonna",
    "A red circle , a blue square .", "dogs' toys", "1,000 people", "Mr. Smith's car.", "a/b test",
    "A man riding a wave on top of a surfboard.", "A group of people standing around a kitchen.",
    "Two giraffes standing next to each other in a field", "A plate of food with broccoli, carrots and rice.",
    "A woman is holding an umbrella while walking in the rain.", "An old-fashioned clock tower in the city's center.",
    "A close up of a pizza on a table", "There are 3 dogs playing with a frisbee.",
    "\"A sign that reads 'STOP' on the street.\"", "A kid's birthday cake with candles",
    "The bathroom has a toilet, sink, and mirror.", "A red double-decker bus driving down the street.",
    "People are skiing down a snow-covered slope.", "a green triangle, a yellow circle and a blue square",
    "It costs 5.00 dollars.", "a 'quoted' word", "I said no. Then", "No. 5 on the list", "hello?!", "wait!!",
    "gimme the ball", "y'all come", "lemme see",
    # where npvlm's stand-in differs (docs/evaluation.md): kept to measure, not to pass
    # (":)" is one token ":-rrb-" for PTB unless it ends the whole input: not last here)
    "a cat :)", "rock 'n' roll", "Gov. Brown spoke at St. Mary's",
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vqa-eval", required=True, help="path to the official vqaEval.py")
    args = parser.parse_args()
    if not shutil.which("java"):
        sys.exit("java is needed for pycocoevalcap's PTB tokenizer")
    vqa = cases.vqa_cases(0, 800)
    anls = cases.text_pairs(0, 400)
    relaxed = cases.relaxed_cases(0, 400)
    captions = []
    for seed, n in ((0, 30), (1, 50), (2, 5), (3, 2)):
        p, r = cases.caption_corpus(seed, n)
        if seed == 1:
            p[3] = ""                                              # an empty prediction
        b, bs, c, cs = ref.coco_caption_scores(p, r)
        captions.append({"predictions": p, "references": r, "bleu4": b, "bleu4_per_example": bs,
                         "cider": c, "cider_per_example": cs})
    detection = []
    for seed, n in ((0, 10), (1, 20), (2, 6), (3, 1), (4, 30)):
        p, g = cases.detection_set(seed, n)
        detection.append({"predictions": p, "ground_truth": g, **ref.coco_detection_map(p, g)})
    p, g = cases.crowded_set(0)
    detection.append({"predictions": p, "ground_truth": g, **ref.coco_detection_map(p, g)})
    p, g = cases.detection_set(5, 8)
    detection.append({"predictions": [[] for _ in p], "ground_truth": g, **ref.coco_detection_map([[] for _ in p], g)})
    perfect = [[{**o, "score": 1.0} for o in image] for image in g]
    detection.append({"predictions": perfect, "ground_truth": g, **ref.coco_detection_map(perfect, g)})
    golden = {
        "format_version": METRIC_FORMAT_VERSION,
        "made_with": {"vqa": "GT-Vision-Lab/VQA vqaEval.py (a013f00), lib2to3 print fixer",
                      "captions": "pycocoevalcap 1.2 Bleu(4), Cider(), PTBTokenizer (java)",
                      "detection": "pycocotools COCOeval bbox", "anls": "big_vision anls_metric rule, editdistance",
                      "relaxed": "big_vision chartqa _relaxed_match rule, lower-cased"},
        "vqa": [{"prediction": p, "answers": a, "accuracy": acc}
                for (p, a), acc in zip(vqa, ref.official_vqa_accuracies(vqa, args.vqa_eval))],
        "anls": [{"prediction": p, "answers": a, "anls": ref.anls_reference(p, a)} for p, a in anls],
        "relaxed": [{"prediction": p, "answer": a, "relaxed": ref.relaxed_reference(p, a)} for p, a in relaxed],
        "captions": captions,
        "ptb": [{"caption": c, "tokens": t} for c, t in zip(PTB_CAPTIONS, ref.ptb_tokenize(PTB_CAPTIONS))],
        "detection": detection,
    }
    OUT.write_text(json.dumps(golden, indent=0) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
