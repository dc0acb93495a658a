"""Stage-1 training throughput (tokens/s) and peak memory of the default job's model, with 1 and 2 processes.

Uses the built-in default config (SmolLM2-135M, LibreOffice corpora) up to its upcycled round-1 model, then
trains stage 1 for a few steps in a scratch run directory: once as one process, once with torchrun over two
gloo processes (same micro-batch per process, so the 2-process run processes twice the tokens per step).

    python benchmarks/train_throughput.py                    # 8 steps, micro-batch 4 x 256 tokens
    python benchmarks/train_throughput.py --steps 4 --block 128
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str]) -> float:
    """Run a command; return its wall time. Fails loudly with its output."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--block", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for procs in (1, 2):
            run_dir = Path(tmp) / f"p{procs}"
            overrides = [f"run_dir={run_dir}", f"train.stage1.steps={args.steps}", "train.stage1.warmup_steps=1",
                         f"train.stage1.micro_batch_size={args.micro_batch}", f"train.stage1.block_length={args.block}",
                         "train.ds_config=ds_configs/zero1_fp32.json", "analyze.tokens_per_language=2000"]
            run([sys.executable, "-m", "pipeline.cli", "run", args.config, "--until", "upcycle", *overrides])
            launcher = ([sys.executable, "stages/train.py"] if procs == 1 else
                        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                         "127.0.0.1", "--master_port", str(free_port()), "stages/train.py"])
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            wall = run([*launcher, "--config", args.config, "--stage", "1", "--round", "g1", *overrides])
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            summary = json.loads((run_dir / "g1" / "train_stage1" / "manifest.json").read_text())["summary"]
            results[procs] = (summary["tokens_per_second"], max(peak, before) / 2**20, wall)
        print(f"stage-1 training, {args.steps} steps, micro-batch {args.micro_batch} x {args.block} tokens per process, "
              f"fp32 ZeRO-1 on CPU ({os.cpu_count()} cores)")
        print(f"{'processes':>9} {'tokens/s':>10} {'peak RSS per process GiB':>25} {'wall s (incl. start-up)':>24}")
        for procs, (tps, peak, wall) in results.items():
            print(f"{procs:>9} {tps:>10.0f} {peak:>25.2f} {wall:>24.1f}")
        print(f"ratio 2 processes / 1 process: {results[2][0] / results[1][0]:.2f}x tokens/s")


if __name__ == "__main__":
    main()
