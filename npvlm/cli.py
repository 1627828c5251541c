"""The command line: answer a prompt about an image with PaliGemma, in NumPy (or CuPy).

    npvlm                                  # the embedded demo model on a bundled sample scene
    npvlm IMAGE PROMPT [--model DIR|ORG/NAME] [options]
    python -m npvlm ...  /  python run.py ...      (the same program)

stdout carries only the answer (or one JSON object with --json); progress and notes go to
stderr. Errors print one `error:` line and exit 1 (2 for options argparse rejects); --debug
shows the traceback. A closed stdout (`| head`) ends the program quietly.
"""

import json
import sys
import time
from pathlib import Path

from . import cpu
from .api import check_model_dir, check_weights_option, load
from .backend import get_backend
from .commands import ArgumentParser, run_main, silence_stdout
from .config import load_config
from .demo import MODEL_DIR as DEMO_MODEL
from .demo import SAMPLE_SCENE
from .demo.scenes import trained_prompts
from .errors import InputError
from .generation.generate import check_generation_args
from .generation.sampling import SamplingOptions
from .inputs.image import load_image
from .inputs.processor import Processor
from .saving.atomic import (
    check_new_folder,
    check_outside,
    check_path_given,
    check_writable,
    image_format,
    save_image_atomic,
)
from .tasks.draw import draw_objects
from .tasks.segmentation import load_vae, object_masks


def build_parser():
    parser = ArgumentParser(prog="npvlm", description="PaliGemma in NumPy: answer PROMPT about IMAGE.")
    parser.add_argument("image", nargs="?", help="image file (anything Pillow opens); default: a bundled "
                   "sample scene")
    parser.add_argument("prompt", nargs="?", default="caption en",
                   help='task prompt, e.g. "caption en", "answer en what is this?", "detect cat"')
    parser.add_argument("--model", metavar="DIR|ORG/NAME", default="demo", help="a PaliGemma folder "
                   "(config.json, *.safetensors, tokenizer.model), a Hugging Face Hub id such as "
                   "google/paligemma-3b-mix-224 (from the local cache, downloaded if needed), or "
                   "'demo', the embedded demo model")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                   help="the most tokens to generate (the answer may end sooner, at <eos>)")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="1 = off")
    parser.add_argument("--seed", type=int, default=None, metavar="S", help="for sampling")
    parser.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")
    parser.add_argument("--backend", choices=["numpy", "cupy"], default="numpy",
                   help="array library: numpy (CPU) or cupy (an NVIDIA GPU; docs/gpu.md)")
    parser.add_argument("--weights", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: keep the weight matrices in bfloat16, half the memory (3B-224: "
                        "6.1 GB of RAM instead of 11.8 GB), about half the decoding speed; numpy only")
    parser.add_argument("--stream", action="store_true", help="print text as it is generated")
    parser.add_argument("--json", action="store_true", help="print one JSON object: text, tokens, "
                   "finish_reason, timings, detected objects")
    parser.add_argument("--draw", metavar="OUT.png", help="write the image with detected boxes, labels "
                   "and (with --vae) segmentation masks")
    parser.add_argument("--vae", metavar="vae-oid.npz", help="big_vision's VQ-VAE mask decoder, to turn "
                   "the <seg> tokens of `segment ...` answers into masks "
                   "(gs://big_vision/paligemma/vae-oid.npz)")
    parser.add_argument("--loc-divisor", type=int, choices=[1024, 1023], default=1024,
                   help="map <locNNNN> bins to pixels as bin/1024*size (public demo) or bin/1023 "
                        "(big_vision)")
    parser.add_argument("--explain", metavar="REPORT.html", help="also write a page that shows why the "
                   "model gave each answer token: heatmaps on the image (gradients, attention by layer "
                   "and head), the tokens' probabilities, the logit lens (docs/interpretability.md)")
    parser.add_argument("--explain-dir", metavar="DIR", help="also write the explanation's maps as PNG "
                   "files (one per answer token and map kind) and explanation.json into DIR, a new folder")
    parser.add_argument("--threads", type=int, metavar="N", help="BLAS threads on the CPU (default: "
                   "all cores on a quiet machine, fewer on a busy one; NPVLM_THREADS=N too)")
    parser.add_argument("--allow-huge-image", action="store_true",
                   help="decode images above Pillow's decompression-bomb limit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def parse_args(argv):
    return build_parser().parse_args(argv)


def check_prompt_text(prompt):
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:   # argv bytes that are not UTF-8 arrive as lone surrogates
        ch = prompt[e.start]
        what = f"byte 0x{ord(ch) - 0xDC00:02x}" if "\udc80" <= ch <= "\udcff" else f"U+{ord(ch):04X}"
        raise InputError(f"the prompt is not valid UTF-8 text ({what} at character {e.start}); "
                         "pass it in UTF-8") from None


def check_threads_option(n):
    """--threads N, else NPVLM_THREADS, checked (and fixed) before any loading."""
    if n is not None and n < 1:
        raise InputError(f"--threads must be >= 1, got {n}")
    cpu.from_environment()


def check_before_load(args):
    """Every check that needs no weights, in the order a user would fix them, so a mistake
    costs no loading time. Returns (model folder, image)."""
    check_prompt_text(args.prompt)
    SamplingOptions(args.temperature, args.top_k, args.top_p, args.seed)
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.stream and args.json:
        raise InputError("--stream and --json cannot be combined: --json prints one object when "
                         "the answer is complete")
    check_weights_option(args.weights, args.backend)
    check_threads_option(args.threads)
    image_path = SAMPLE_SCENE if args.image is None else args.image
    for flag, value in (("--draw", args.draw), ("--explain", args.explain), ("--explain-dir", args.explain_dir)):
        check_path_given(flag, value)
    image = load_image(image_path, allow_huge=args.allow_huge_image)
    get_backend(args.backend)
    folder = check_model_dir(args.model)
    check_outputs(args, image_path, folder)
    cfg = load_config(folder)
    # the prompt's exact length, from the tokenizer (cheap), against the model's positions
    tokenizer = Processor.from_model_dir(folder, cfg).tokenizer
    prompt_len = len(tokenizer.prompt_ids(args.prompt, cfg.num_image_tokens)[0])
    check_generation_args(cfg, prompt_len, args.max_new_tokens)
    return folder, image


def check_outputs(args, image_path, folder):
    """The output paths, before any work: no two the same place or one inside another, none
    inside the model folder, each writable and never an input (the image, the VAE file)."""
    outputs = [(flag, Path(value).resolve()) for flag, value in
               (("--draw", args.draw), ("--explain", args.explain), ("--explain-dir", args.explain_dir)) if value]
    for i, (flag_a, a) in enumerate(outputs):
        for flag_b, b in outputs[i + 1:]:
            if a == b or a in b.parents or b in a.parents:
                raise InputError(f"{flag_a} and {flag_b} both write to {min(a, b, key=lambda p: len(p.parts))}; "
                                 "give each its own path")
    for flag, path in outputs:
        check_outside(flag, path, folder)
    inputs = [image_path if not str(image_path).startswith(("http://", "https://")) else None, args.vae]
    if args.draw:
        check_writable(args.draw, inputs=inputs)
        image_format(args.draw)
    if args.explain:
        if Path(args.explain).suffix.lower() not in (".html", ".htm"):
            raise InputError(f"{args.explain}: the explanation is a web page; give a file name ending in .html")
        check_writable(args.explain, inputs=inputs, example="report.html")
    if args.explain_dir:
        check_new_folder(args.explain_dir)


def notes(args, folder, result):
    """One-line notes on stderr about an answer that may not be what the user wanted."""
    if folder == DEMO_MODEL and args.prompt not in trained_prompts():
        print(f"note: the demo model was trained only on its shape-world tasks (docs/demo.md: "
              f"caption en, answer en what color is the circle?, answer en what shape is red?, "
              f"answer en how many shapes are there?, answer en how many circles are there?, "
              f"detect circle, detect circle ; square ...); {args.prompt!r} is not one of them, "
              "so its answer means nothing", file=sys.stderr)
    if result.finish_reason == "length":
        print(f"note: the answer was cut at --max-new-tokens {args.max_new_tokens} before the model "
              "ended it; raise --max-new-tokens for the rest", file=sys.stderr)


def objects_json(found, masks):
    return [{"label": o.label, "box_yxyx": [round(v, 2) for v in o.box], "loc_bins": list(o.bins),
             "seg_codes": list(o.seg) if o.seg else None,
             "mask_pixels": None if m is None else int(m.sum())}
            for o, m in zip(found.objects, masks)]


def write_stdout(text):
    """Write (and flush) to stdout; a failed write is a one-line error, a closed pipe goes up
    as BrokenPipeError (a quiet end)."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as e:                     # e.g. stdout is a file on a full disk
        silence_stdout()                     # the interpreter's flush at exit would fail again
        raise InputError(f"cannot write the answer to stdout ({e.strerror or e})") from None


def run(args):
    folder, image = check_before_load(args)
    vae = load_vae(args.vae) if args.vae else None
    if args.threads is not None and cpu.more_than_cores(args.threads):
        print(f"note: --threads {args.threads}: {cpu.more_than_cores(args.threads)}", file=sys.stderr)
    with cpu.threads_fixed(args.threads):    # an in-process run leaves the session's setting as it was
        return answer(args, folder, image, vae)


def answer(args, folder, image, vae):
    t0 = time.perf_counter()
    print(f"loading {args.model} ({args.backend})", file=sys.stderr)
    model = load(folder, backend=args.backend, weights=args.weights)
    print(f"loaded in {time.perf_counter() - t0:.2f} s: {model}", file=sys.stderr)

    result = model.generate(image, args.prompt, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            seed=args.seed, stop=args.stop, stream=write_stdout if args.stream else None)
    if args.stream:
        write_stdout("\n")          # end the streamed answer before anything else is printed
    t = result.timings
    print(f"image encode {t['image_encode_s']:.3f} s, prefill {t['prefill_s']:.3f} s "
          f"({t['prefill_tokens']} tokens), decode {len(result.tokens)} tokens"
          + (f" at {t['decode_tokens_per_s']:.1f} tok/s" if t["decode_tokens_per_s"] else ""),
          file=sys.stderr)
    notes(args, folder, result)

    found = result.detections(args.loc_divisor)   # empty unless the answer holds <loc> tokens
    for problem in found.problems:
        print(f"warning: malformed detection record {problem.text!r}: {problem.reason}", file=sys.stderr)
    masks = [None] * len(found.objects)
    if any(o.seg is not None for o in found.objects):
        if vae is None:
            print("note: the answer has segmentation codes; to turn them into masks pass --vae "
                  "vae-oid.npz (download it from gs://big_vision/paligemma/vae-oid.npz)", file=sys.stderr)
        else:
            masks = object_masks(found.objects, vae, image.width, image.height)
    if args.draw:
        save_image_atomic(draw_objects(image, found.objects, masks), args.draw)
        print(f"drew {len(found.objects)} object(s) to {args.draw}", file=sys.stderr)
    if args.json:
        write_stdout(json.dumps({"text": result.text, "tokens": result.tokens,
                                 "finish_reason": result.finish_reason, "timings": result.timings,
                                 "objects": objects_json(found, masks),
                                 "malformed": [{"text": bad.text, "reason": bad.reason}
                                               for bad in found.problems]}) + "\n")
    elif not args.stream:
        write_stdout(result.text + "\n")
    if args.explain or args.explain_dir:          # after the answer is out
        explain_answer(args, model, image, result)
    return 0


def explain_answer(args, model, image, result):
    """--explain / --explain-dir: why the model gave the answer it just gave (its tokens, as
    generated, sampled ones too), written as a page and/or PNG maps."""
    from .explain.report import write_maps, write_report  # noqa: PLC0415 (only with --explain)
    t0 = time.perf_counter()
    exp = model.explain(image, args.prompt, answer=result.tokens)
    if args.explain:
        write_report(exp, model.processor.tokenizer, args.explain, model_name=args.model, divisor=args.loc_divisor)
        print(f"explained {len(exp.tokens)} answer token(s) in {time.perf_counter() - t0:.2f} s: {args.explain}",
              file=sys.stderr)
    if args.explain_dir:
        write_maps(exp, args.explain_dir)
        print(f"wrote the maps of {len(exp.tokens)} answer token(s) to {args.explain_dir}", file=sys.stderr)


def main(argv=None):
    return run_main(run, parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
