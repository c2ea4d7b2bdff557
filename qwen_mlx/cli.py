"""What every qwen_mlx command line shares: how it fails.

One convention for `python -m qwen_mlx.generate`, `.convert`, `.parity`, `.perplexity` and `.tune`:
exit status 2 for a usage error (an unknown flag, a bad flag value: found before any work
starts), 1 for a runtime error (a missing or unreadable file, a prompt over the model's
context), each reported as ONE line on stderr; 0 on success. (`parity` also exits 1 when the
two paths diverge: the check it runs failed.)
"""

from __future__ import annotations

import argparse
import sys

USAGE_ERROR = 2
RUNTIME_ERROR = 1


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage error as one line ("PROG: error: MESSAGE (see --help)") and exit 2."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(USAGE_ERROR)


def runtime_error(e: BaseException | str) -> int:
    """Print `error: MESSAGE` on one line (naming the file of an OSError) and return RUNTIME_ERROR."""
    msg = " ".join(str(e).split())
    if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
        msg = f"{e.filename}: {msg}"
    print(f"error: {msg}", file=sys.stderr)
    return RUNTIME_ERROR
