#!/usr/bin/env python3
"""Answer a prompt about an image with PaliGemma, in NumPy (or CuPy).

    python run.py                          # the embedded demo model on a bundled sample scene
    python run.py IMAGE PROMPT [--model DIR] [options]

stdout carries only the answer (or one JSON object with --json); progress and diagnostics go to
stderr. Errors print one line and exit non-zero; --debug shows the traceback.
"""

import argparse
import json
import sys
import time


class _Parser(argparse.ArgumentParser):
    def error(self, message):                     # one line instead of usage + message
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv):
    p = _Parser(description="PaliGemma in NumPy: answer PROMPT about IMAGE.")
    p.add_argument("image", nargs="?", help="image file (anything Pillow opens); default: a bundled "
                   "sample scene")
    p.add_argument("prompt", nargs="?", default="caption en",
                   help='task prompt, e.g. "caption en" (default), "answer en what is this?", "detect cat"')
    p.add_argument("--model", metavar="DIR", default="demo", help="PaliGemma folder: config.json, "
                   "*.safetensors, tokenizer.model; default: the embedded demo model")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="1 = off")
    p.add_argument("--seed", type=int, default=None, metavar="S")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    p.add_argument("--weights", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: keep the weight matrices in bfloat16, half the memory (3B: ~5.9 GB "
                        "instead of ~11.7 GB), about half the decoding speed; numpy only")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--json", action="store_true", help="print one JSON object: text, tokens, "
                   "timings, detected objects")
    p.add_argument("--draw", metavar="OUT.png", help="write the image with detected boxes, labels "
                   "and (with --vae) segmentation masks")
    p.add_argument("--vae", metavar="vae-oid.npz", help="big_vision's VQ-VAE mask decoder, to turn the "
                   "<seg> tokens of `segment ...` answers into masks (gs://big_vision/paligemma/vae-oid.npz)")
    p.add_argument("--loc-divisor", type=int, choices=[1024, 1023], default=1024,
                   help="map <locNNNN> bins to pixels as bin/1024*size (public demo, default) or bin/1023 (big_vision)")
    p.add_argument("--allow-huge-image", action="store_true",
                   help="decode images above Pillow's decompression-bomb limit")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line, unless --debug
        if args.debug:
            raise
        from npvlm.errors import NpvlmError
        kind = "error" if isinstance(e, NpvlmError) else f"internal error ({type(e).__name__})"
        print(f"{kind}: {e}".splitlines()[0] if str(e) else kind, file=sys.stderr)
        return 1


def run(args):
    import npvlm
    from npvlm.errors import InputError
    from npvlm.image import load_image
    from npvlm.atomic import check_writable, image_format, save_image_atomic
    from npvlm.demo import SAMPLE_SCENE
    from npvlm.model import check_weights_option
    from npvlm.sampling import SamplingOptions

    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as e:   # argv bytes that are not UTF-8 arrive as lone surrogates
        ch = args.prompt[e.start]
        what = f"byte 0x{ord(ch) - 0xDC00:02x}" if "\udc80" <= ch <= "\udcff" else f"U+{ord(ch):04X}"
        raise InputError(f"the prompt is not valid UTF-8 text ({what} at character {e.start}); "
                         "pass it in UTF-8") from None
    # every check that needs no model runs before the (slow) load
    SamplingOptions(args.temperature, args.top_k, args.top_p, args.seed)
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    check_weights_option(args.weights, args.backend)
    image_path = SAMPLE_SCENE if args.image is None else args.image
    if args.draw:
        check_writable(args.draw, inputs=[image_path])
        image_format(args.draw)
    image = load_image(image_path, allow_huge=args.allow_huge_image)
    vae = None
    if args.vae:
        from npvlm.segmentation import load_vae
        vae = load_vae(args.vae)

    t0 = time.perf_counter()
    print(f"loading {args.model} ({args.backend})", file=sys.stderr)
    model = npvlm.load(args.model, backend=args.backend, weights=args.weights)
    model.processor  # a missing tokenizer.model is reported before any generation work
    print(f"loaded in {time.perf_counter() - t0:.2f} s: {model}", file=sys.stderr)

    stream = None
    if args.stream and not args.json:
        def stream(piece):
            sys.stdout.write(piece)
            sys.stdout.flush()
    result = model.generate(image, args.prompt, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            seed=args.seed, stop=args.stop, stream=stream)
    t = result.timings
    print(f"image encode {t['image_encode_s']:.3f} s, prefill {t['prefill_s']:.3f} s "
          f"({t['prefill_tokens']} tokens), decode {len(result.tokens)} tokens"
          + (f" at {t['decode_tokens_per_s']:.1f} tok/s" if t["decode_tokens_per_s"] else ""),
          file=sys.stderr)
    found = result.detections(args.loc_divisor)   # empty unless the answer holds <loc> tokens
    for problem in found.problems:
        print(f"warning: malformed detection record {problem.text!r}: {problem.reason}", file=sys.stderr)
    masks = [None] * len(found.objects)
    if any(o.seg is not None for o in found.objects):
        if vae is None:
            print("note: the answer has segmentation codes; to turn them into masks pass --vae "
                  "vae-oid.npz (download it from gs://big_vision/paligemma/vae-oid.npz)", file=sys.stderr)
        else:
            from npvlm.segmentation import object_masks
            masks = object_masks(found.objects, vae, image.width, image.height)
    if args.draw:
        from npvlm.draw import draw_objects
        save_image_atomic(draw_objects(image, found.objects, masks), args.draw)
        print(f"drew {len(found.objects)} object(s) to {args.draw}", file=sys.stderr)
    if args.json:
        objects = [{"label": o.label, "box_yxyx": [round(v, 2) for v in o.box], "loc_bins": list(o.bins),
                    "seg_codes": list(o.seg) if o.seg else None,
                    "mask_pixels": None if m is None else int(m.sum())}
                   for o, m in zip(found.objects, masks)]
        print(json.dumps({"text": result.text, "tokens": result.tokens,
                          "finish_reason": result.finish_reason, "timings": result.timings,
                          "objects": objects,
                          "malformed": [{"text": p.text, "reason": p.reason} for p in found.problems]}))
    elif stream is not None:
        print()
    else:
        print(result.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
