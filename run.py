#!/usr/bin/env python3
"""Answer a prompt about an image with PaliGemma, in NumPy (or CuPy).

    python run.py IMAGE PROMPT --model DIR [options]

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
    p.add_argument("image", help="image file (anything Pillow opens)")
    p.add_argument("prompt", help='task prompt, e.g. "caption en", "answer en what is this?", "detect cat"')
    p.add_argument("--model", metavar="DIR", help="PaliGemma folder: config.json, *.safetensors, tokenizer.model")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="1 = off")
    p.add_argument("--seed", type=int, default=None, metavar="S")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--json", action="store_true", help="print one JSON object: text, tokens, timings")
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
    from npvlm.sampling import SamplingOptions

    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError("the prompt is not valid UTF-8 text") from None
    # every check that needs no model runs before the (slow) load
    SamplingOptions(args.temperature, args.top_k, args.top_p, args.seed)
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.model is None:
        raise InputError("no model given: pass --model DIR, a PaliGemma folder with config.json, "
                         "*.safetensors and tokenizer.model (see docs/checkpoints.md)")
    image = load_image(args.image)

    t0 = time.perf_counter()
    print(f"loading {args.model} ({args.backend})", file=sys.stderr)
    model = npvlm.load(args.model, backend=args.backend)
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
    if args.json:
        print(json.dumps({"text": result.text, "tokens": result.tokens,
                          "finish_reason": result.finish_reason, "timings": result.timings}))
    elif stream is not None:
        print()
    else:
        print(result.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
