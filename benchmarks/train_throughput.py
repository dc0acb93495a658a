"""Stage-1 training throughput (tokens/s) and peak memory of the default job's model: 1 process, 2 processes
data parallel, and 2 processes with expert parallelism (ep_size=2).

Uses the built-in default config (SmolLM2-135M, LibreOffice corpora) up to its upcycled round-1 model (prepared
once), then trains stage 1 for a few steps in scratch copies of that run: as one process, then with torchrun
over two gloo processes (same micro-batch per process, so 2 processes handle twice the tokens per step).

    python benchmarks/train_throughput.py                    # 8 steps, micro-batch 4 x 256 tokens
    python benchmarks/train_throughput.py --steps 4 --block 128
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.ranks import free_port

ROOT = Path(__file__).resolve().parents[1]


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
    parser.add_argument("--ds-config", default="ds_configs/zero1_fp32.json")
    args = parser.parse_args()
    variants = {"1 process": (1, 1), "2 processes, data parallel": (2, 1), "2 processes, ep_size=2": (2, 2)}
    with tempfile.TemporaryDirectory() as tmp:
        settings = [f"train.stage1.steps={args.steps}", "train.stage1.warmup_steps=1",
                    f"train.stage1.micro_batch_size={args.micro_batch}", f"train.stage1.block_length={args.block}",
                    f"train.ds_config={args.ds_config}", "analyze.tokens_per_language=2000"]
        prepared = Path(tmp) / "prepared"
        print("preparing the upcycled model (tokenize, analyze, allocate, upcycle) ...", flush=True)
        run([sys.executable, "-m", "pipeline.cli", "run", args.config, "--until", "upcycle", f"run_dir={prepared}",
             *settings])
        results = {}
        for name, (procs, ep_size) in variants.items():
            run_dir = Path(tmp) / f"p{procs}_ep{ep_size}"
            shutil.copytree(prepared, run_dir)
            overrides = [f"run_dir={run_dir}", f"train.ep_size={ep_size}", *settings]
            launcher = ([sys.executable, "stages/train.py"] if procs == 1 else
                        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                         "127.0.0.1", "--master_port", str(free_port()), "stages/train.py"])
            print(f"training: {name} ...", flush=True)
            wall = run([*launcher, "--config", args.config, "--stage", "1", "--round", "g1", *overrides])
            summary = json.loads((run_dir / "g1" / "train_stage1" / "manifest.json").read_text())["summary"]
            results[name] = (summary["tokens_per_second"], summary["peak_memory_gib"], wall)
        print(f"\nstage-1 training, {args.steps} steps, micro-batch {args.micro_batch} x {args.block} tokens per process, "
              f"{args.ds_config} on CPU ({os.cpu_count()} cores)")
        print(f"{'':>28} {'tokens/s':>10} {'peak RSS of rank 0, GiB':>24} {'wall s (incl. start-up)':>24}")
        for name, (tps, peak, wall) in results.items():
            print(f"{name:>28} {tps:>10.0f} {peak:>24.2f} {wall:>24.1f}")
        base = results["1 process"][0]
        for name in list(variants)[1:]:
            print(f"ratio {name} / 1 process: {results[name][0] / base:.2f}x tokens/s")


if __name__ == "__main__":
    main()
