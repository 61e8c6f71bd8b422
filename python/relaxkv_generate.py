"""The ``relaxkv-generate`` command's first module: it imports nothing heavy, so a Ctrl-C while torch and the
packages load (the first seconds) ends with the CLI's one line and status 130, as one during the run does."""
import sys


def main() -> int:
    """:func:`relaxkv_gen.cli.main`, imported here; a KeyboardInterrupt during that import is one line, status 130."""
    try:
        from relaxkv_gen.cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write("relaxkv-generate: interrupted\n")
        return 130
    return run()
