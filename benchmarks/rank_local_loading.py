"""Host memory of loading an expanded model for expert parallelism: rank-local loading vs load-then-shard.

Starts 2 gloo ranks (ep_size 2) per method, each in a fresh process; every rank loads the exported LayerMoE model
at MODEL_DIR and keeps only its experts, either

* ``load-then-shard`` (what training did before): the whole model (``load_causal_lm``), then ``shard_model``;
* ``rank-local`` (``load_sharded_model``): the model built on the meta device, sharded, and only the shared
  tensors and the rank's own experts read from the safetensors files;

and reports, per rank: RSS before loading, the peak RSS while loading (Linux VmHWM), the RSS after, and the bytes
of the parameters it holds. Both methods' sharded state dicts are compared (they must be equal).

    python benchmarks/rank_local_loading.py /tmp/run/g1/upcycle/model [--dtype float32]
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.log import human_bytes
from pipeline.memory import process_status_bytes
from pipeline.ranks import free_port

METHODS = ("load-then-shard", "rank-local")


def _worker(rank: int, method: str, path: str, dtype: str, port: int, results) -> None:
    from pipeline.base_model import load_causal_lm
    from pipeline.expert_parallel import load_sharded_model, shard_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(minutes=10))
    try:
        before = process_status_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        if method == "load-then-shard":
            model = load_causal_lm(Path(path), dtype, "cpu")
            shard_model(model, dist.group.WORLD)
        else:
            model, _ = load_sharded_model(Path(path), getattr(torch, dtype), "cpu", dist.group.WORLD)
        held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        checksum = sum(float(t.double().sum()) for t in model.state_dict().values() if t.is_floating_point())
        results[method, rank] = (before, process_status_bytes("VmHWM"), process_status_bytes("VmRSS"), held, checksum)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="an exported LayerMoE model directory (e.g. <run>/g1/upcycle/model)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    if not (Path(args.model) / "config.json").is_file():
        sys.exit(f"{args.model}: no config.json (an exported LayerMoE model directory is needed)")
    with mp.Manager() as manager:
        results = manager.dict()
        for method in METHODS:
            mp.spawn(_worker, args=(method, args.model, args.dtype, free_port(), results), nprocs=2, join=True)
        results = dict(results)
    size = sum(f.stat().st_size for f in Path(args.model).glob("*.safetensors"))
    print(f"{args.model}: {human_bytes(size)} of safetensors, 2 ranks, ep_size 2, {args.dtype}")
    print(f"{'method':16} {'rank':>4} {'RSS before':>11} {'peak RSS':>11} {'RSS after':>11} {'peak growth':>12} "
          f"{'held':>11}")
    for method in METHODS:
        for rank in range(2):
            before, peak, after, held, _ = results[method, rank]
            print(f"{method:16} {rank:>4} {human_bytes(before):>11} {human_bytes(peak):>11} {human_bytes(after):>11} "
                  f"{human_bytes(peak - before):>12} {human_bytes(held):>11}")
    for rank in range(2):
        old, new = results[METHODS[0], rank], results[METHODS[1], rank]
        print(f"rank {rank}: peak growth rank-local / load-then-shard = {(new[1] - new[0]) / (old[1] - old[0]):.2f}; "
              f"same bytes held and checksum: {old[4] == new[4] and old[3] == new[3]}")


if __name__ == "__main__":
    main()
