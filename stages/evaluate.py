"""Entry point of the evaluate stage: `python stages/evaluate.py --config C [--round R] [KEY=VALUE ...]`."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *[a for a in sys.argv[1:] if not a.startswith("--local_rank")]]))
