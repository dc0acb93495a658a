"""Entry point of the upcycle stage: `python stages/upcycle.py --config C [KEY=VALUE ...]`."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["upcycle", *sys.argv[1:]]))
