"""What the commands share (`npvlm`: npvlm/cli.py; `python -m npvlm.finetune`:
npvlm/finetune.py; `python -m npvlm.evaluate`: npvlm/evaluate.py): an argument parser whose
errors are one line, a --help that shows each default, and a `main` that turns every error
into one line and an exit status."""

import argparse
import os
import sys

from .errors import error_line

SIGPIPE_EXIT = 141          # 128 + SIGPIPE: what a Unix tool whose reader went away exits with


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, except where there is none (None, off, a --no-X flag)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or isinstance(action, argparse._StoreFalseAction):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one `error: ... (see --help)` line (exit 2) instead of usage + message."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def add_run_options(parser, threads_help):
    """The options every command that runs a model shares: --backend, --threads, --quiet, --debug."""
    add = parser.add_argument
    add("--backend", choices=("numpy", "cupy"), default="numpy", help="array library: numpy (CPU) or cupy (a GPU)")
    add("--threads", type=int, metavar="N", help=threads_help)
    add("--quiet", action="store_true", help="no progress bar")
    add("--debug", action="store_true", help="show tracebacks")


def silence_stdout():
    """Point stdout at /dev/null, so the interpreter's own flush at exit cannot fail again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def run_main(run, args, interrupted="interrupted"):
    """`run(args)`'s exit status, with every way it can end as a command should: Ctrl-C prints
    `interrupted` (exit 130); a closed stdout (`| head`) ends quietly (141); any other error is
    one line, `error: ...` for bad input (exit 1), its traceback only with --debug."""
    try:
        return run(args)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except BrokenPipeError:            # the reader closed the pipe: stop quietly
        silence_stdout()
        return SIGPIPE_EXIT
    except Exception as e:  # one line, unless --debug
        if args.debug:
            raise
        print(error_line(e), file=sys.stderr)
        return 1
