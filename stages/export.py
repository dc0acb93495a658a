"""Entry point of the export stage: `python stages/export.py --config C [--round R] [KEY=VALUE ...]`."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *[a for a in sys.argv[1:] if not a.startswith("--local_rank")]]))
