"""Entry point of the analyze stage: `python stages/analyze.py --config C [KEY=VALUE ...]` (also under torchrun)."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["analyze", *sys.argv[1:]]))
