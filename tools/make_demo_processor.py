"""Write the processor and tokenizer files of a hub PaliGemma repository into a model folder, so
transformers' `PaliGemmaProcessor.from_pretrained` loads it as it loads google/paligemma-*.

    python tools/make_demo_processor.py                     # npvlm/demo/model
    python tools/make_demo_processor.py --model DIR

Writes, with transformers' own `save_pretrained` (needs the reference extra):
- `preprocessor_config.json`: SigLIP preprocessing at the model's image size (bicubic resize,
  rescale 1/255, mean = std = 0.5) with `image_seq_length` and `processor_class`, the name and
  form the hub repositories use;
- `tokenizer.json` and `tokenizer_config.json`: transformers' Gemma tokenizer converted from the
  folder's `tokenizer.model` (left padding, as PaliGemma generates), `<image>` an extra special token;
- `generation_config.json`: the bos / eos / pad ids.
npvlm itself reads none of them (config.json, the safetensors and tokenizer.model are its
inputs), and its fine-tuning export copies them along. tools/train_demo.py calls this on export.
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "tokenizer"


def write_processor_files(folder):
    import transformers
    from transformers import AutoTokenizer, GenerationConfig, PaliGemmaProcessor, SiglipImageProcessor

    transformers.logging.set_verbosity_error()
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    vision = config["vision_config"]
    size = vision.get("image_size", 224)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(folder / "tokenizer.model", Path(tmp) / "tokenizer.model")
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
            "unk_token": "<unk>", "mask_token": "<mask>", "add_bos_token": True, "add_eos_token": False,
            "padding_side": "left", "clean_up_tokenization_spaces": False}))
        # transformers converts tokenizer.model only with protobuf installed; for the fixture
        # tokenizer (the demo's) its conversion is committed already (tests/make_tokenizer.py)
        if (FIXTURE / "tokenizer.model").read_bytes() == (folder / "tokenizer.model").read_bytes():
            shutil.copy(FIXTURE / "tokenizer.json", Path(tmp) / "tokenizer.json")
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    image_processor = SiglipImageProcessor(size={"height": size, "width": size})
    image_processor.image_seq_length = (size // vision["patch_size"]) ** 2
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        processor.save_pretrained(tmp)
        saved = json.loads((Path(tmp) / "processor_config.json").read_text())
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(Path(tmp) / name, folder / name)
    # the hub repositories' form: the image processor's own file, naming the processor class
    preprocessor = dict(saved["image_processor"], processor_class="PaliGemmaProcessor")
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2, sort_keys=True) + "\n")
    GenerationConfig(bos_token_id=config.get("bos_token_id", 2), eos_token_id=config.get("eos_token_id", 1),
                     pad_token_id=config.get("pad_token_id", 0)).save_pretrained(folder)
    return sorted(p.name for p in folder.iterdir())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=ROOT / "npvlm" / "demo" / "model")
    args = p.parse_args()
    print(" ".join(write_processor_files(args.model)))


if __name__ == "__main__":
    main()
