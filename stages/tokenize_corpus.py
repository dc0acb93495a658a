"""Entry point of the tokenize stage: `python stages/tokenize_corpus.py --config C [--round R] [--force] [KEY=VALUE ...]`.

Also under torchrun, `deepspeed`, `mpirun` and `srun` (see pipeline/ranks.py): the ranks split the work. (Not named
tokenize.py: run as a script, its directory comes first on sys.path, and a stages/tokenize.py would shadow the
standard library's `tokenize` module, which Python itself imports.)"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    # the deepspeed launcher appends --local_rank=N; the rank comes from the environment instead
    sys.exit(main(["tokenize", *[a for a in sys.argv[1:] if not a.startswith("--local_rank")]]))
