"""GPU benchmark of top-2 routing and of one MoE layer (needs CUDA; on CPU use ``moe_block_cpu.py``).

1. Ceilings, measured here: copy bandwidth (a 1 GiB device-to-device copy) and bf16 matmul rate (8192^3).
2. Routing of ``[tokens, E]`` router logits, forward and forward + backward: our Triton kernel
   (``router_kernel.route``) vs the same function's unfused PyTorch path vs DeepSpeed's ``top2gating``
   (dropless, sparse routes: what its MoE layer calls; no second-expert noise). The kernel's achieved bandwidth
   (logits read; probs, weights and indices written) is shown against the copy ceiling.
3. The MoE layer at Qwen1.5-1.8B shape (h 2048, FFN 5504, 6 experts, top-2) in bf16, forward + backward: ours vs
   DeepSpeed's MoE layer (dropless and capacity factor 1.0), with the FLOP rate of the routed expert work against
   the matmul ceiling.

    python benchmarks/router_kernel_gpu.py
    python benchmarks/router_kernel_gpu.py --experts 6 --tokens 65536 --skip-block
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import torch

from moe_block_cpu import TOP_K, deepspeed_moe, init_deepspeed, make_block, timed
from pipeline.hf_modeling.router_kernel import BACKEND_ENV, route

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[2, 3, 5, 6, 8, 16])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--logits-dtype", choices=sorted(DTYPES), default="float32",
                        help="router logits dtype (the MoE block computes them in float32)")
    parser.add_argument("--block-tokens", type=int, default=8192, help="tokens per MoE-layer step (4 x 2048)")
    parser.add_argument("--repeats", type=int, default=10, help="timed MoE-layer steps per method")
    parser.add_argument("--skip-block", action="store_true", help="only the ceilings and the routing benchmark")
    return parser.parse_args(argv)


def bench(fn: Callable[[], object]) -> float:
    """Median seconds of ``fn`` (Triton's ``do_bench``: warm-up, L2 flushed between runs)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3


def ceilings() -> tuple[float, float]:
    """(copy bandwidth in bytes/s, bf16 matmul rate in FLOP/s)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() / bench(lambda: dst.copy_(src))
    a, b = (torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    return bandwidth, 2 * 8192**3 / bench(lambda: a @ b)


def bench_with(backend: str, fn: Callable[[], object]) -> float:
    """``bench(fn)`` with the router backend forced to ``backend``."""
    os.environ[BACKEND_ENV] = backend
    return bench(fn)


def routing_benchmark(experts: list[int], tokens: list[int], dtype: torch.dtype, bandwidth: float) -> None:
    from deepspeed.moe.sharded_moe import top2gating

    row = "{:>3} {:>6}  {:>10} {:>10} {:>10}  {:>10} {:>10} {:>10}  {:>9} {:>7}"
    print("\nrouting, top-2, times in us; fwd = forward, f+b = forward + backward")
    print(row.format("E", "tokens", "ours fwd", "torch fwd", "DS fwd", "ours f+b", "torch f+b", "DS f+b",
                     "ours GB/s", "of copy"))
    for e in experts:
        for n in tokens:
            logits = torch.randn(n, e, device="cuda", dtype=dtype, requires_grad=True)
            grad_w = torch.randn(n, TOP_K, device="cuda")
            balance = torch.rand(e, device="cuda")

            def ours_forward() -> object:
                return route(logits.detach(), TOP_K)

            def ours_step() -> None:
                r = route(logits, TOP_K)
                ((r.weights * grad_w).sum() + (r.prob_sums * balance).sum()).backward()

            def deepspeed_forward() -> object:
                return top2gating(logits.detach().float(), 1.0, 4, drop_tokens=False, top2_2nd_expert_sampling=False,
                                  sparse_routes=True)

            def deepspeed_step() -> None:
                l_aux, *_, gates, _ = top2gating(logits.float(), 1.0, 4, drop_tokens=False,
                                                 top2_2nd_expert_sampling=False, sparse_routes=True)
                ((gates.T * grad_w).sum() + l_aux).backward()

            times = [bench_with("triton", ours_forward), bench_with("torch", ours_forward), bench(deepspeed_forward),
                     bench_with("triton", ours_step), bench_with("torch", ours_step), bench(deepspeed_step)]
            moved = n * e * (logits.element_size() + 4) + n * TOP_K * (4 + 8)
            achieved = moved / times[0]
            print(row.format(e, n, *(f"{1e6 * t:.1f}" for t in times), f"{achieved / 1e9:.0f}",
                             f"{100 * achieved / bandwidth:.0f}%"), flush=True)
    os.environ.pop(BACKEND_ENV, None)


def block_benchmark(tokens: int, repeats: int, matmul_rate: float) -> None:
    hidden, ffn, experts = 2048, 5504, 6
    block = make_block(hidden, ffn, experts, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)
    methods = [("ours", block), ("DeepSpeed dropless", deepspeed_moe(block, drop_tokens=False)),
               ("DeepSpeed cf=1", deepspeed_moe(block, drop_tokens=True))]
    results = timed(methods, x, grad, repeats, sync=torch.cuda.synchronize)
    expert_flops = 3 * tokens * TOP_K * 3 * 2 * hidden * ffn  # forward + backward (~2x forward), routed slots only
    print(f"\nMoE layer, Qwen1.5-1.8B shape (h {hidden}, FFN {ffn}, E {experts}, top-{TOP_K}), bf16, {tokens} tokens")
    print(f"{'method':20} {'fwd ms':>8} {'bwd ms':>8} {'TFLOP/s':>8} {'of matmul':>9}")
    for label, (fwd, bwd, _) in results.items():
        rate = expert_flops / (fwd + bwd)
        print(f"{label:20} {1e3 * fwd:8.2f} {1e3 * bwd:8.2f} {rate / 1e12:8.1f} {100 * rate / matmul_rate:8.0f}%")


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("router_kernel_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                 "on CPU run benchmarks/moe_block_cpu.py")
    init_deepspeed()
    bandwidth, matmul_rate = ceilings()
    device = torch.cuda.get_device_name()
    print(f"{device}: copy {bandwidth / 1e9:.0f} GB/s, bf16 matmul {matmul_rate / 1e12:.0f} TFLOP/s")
    routing_benchmark(args.experts, args.tokens, DTYPES[args.logits_dtype], bandwidth)
    if not args.skip_block:
        block_benchmark(args.block_tokens, args.repeats, matmul_rate)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
