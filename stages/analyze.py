"""Entry point of the analyze stage: `python stages/analyze.py --config C [--round R] [--force] [KEY=VALUE ...]`.

Also under torchrun, `deepspeed`, `mpirun` and `srun` (see pipeline/ranks.py)."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    # the deepspeed launcher appends --local_rank=N; the rank comes from the environment instead
    sys.exit(main(["analyze", *[a for a in sys.argv[1:] if not a.startswith("--local_rank")]]))
