"""Entry point of the allocate stage: `python stages/allocate.py --config C [KEY=VALUE ...]` (also under torchrun)."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["allocate", *sys.argv[1:]]))
