"""The metrics PaliGemma's transfers are reported with, in plain Python and NumPy, each equal
to the implementation the papers used (tests/test_metrics.py; docs/evaluation.md has each
formula, its reference and the known differences).

    from npvlm.metrics import vqa_accuracy, cider
    vqa_accuracy("two", ["2"] * 9 + ["3"])                  # 1.0
    cider(["a red circle", "a blue square"], [["a red circle", "a circle"], ["a square"]])   # corpus CIDEr-D

vqa.py      vqa_accuracy (VQA v2's official rules), anls (DocVQA), relaxed_accuracy (ChartQA),
            exact_match
caption.py  bleu, cider (CIDEr-D), as pycocoevalcap; tokenize (its PTB tokenizer's stand-in)
boxes.py    box_iou, detection_map (COCO mAP, as pycocotools), objects_found, refexp_accuracy
masks.py    mask_iou, miou
"""

from .boxes import box_iou, detection_map, objects_found, refexp_accuracy
from .caption import bleu, bleu_per_example, cider, cider_per_example, tokenize
from .masks import mask_iou, miou
from .vqa import anls, exact_match, normalize_vqa_answer, relaxed_accuracy, vqa_accuracy

__all__ = ["vqa_accuracy", "normalize_vqa_answer", "anls", "relaxed_accuracy", "exact_match", "bleu",
           "bleu_per_example", "cider", "cider_per_example", "tokenize", "box_iou", "detection_map",
           "objects_found", "refexp_accuracy", "mask_iou", "miou"]
