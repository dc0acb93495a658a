"""Entry point of training: `deepspeed stages/train.py --config C --stage 1|2 [--round R] [KEY=VALUE ...]`.

Also runs as `python stages/train.py ...` (one process) and under torchrun."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    # the deepspeed launcher appends --local_rank=N; the rank comes from the environment instead
    sys.exit(main(["train", *[a for a in sys.argv[1:] if not a.startswith("--local_rank")]]))
