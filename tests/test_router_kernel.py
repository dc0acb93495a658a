"""The fused router kernel against the reference PyTorch path: forward outputs, gradients, ties, the classifier
override, a whole MoE block.

The kernel tests (marker ``triton_interpreter``) run natively on a CUDA GPU when there is one (on CUDA tensors;
``scripts/gpu_check.sh``), else on CPU in the Triton interpreter. Triton reads
``TRITON_INTERPRET`` when a kernel is compiled, and the kernels are compiled once per process, so a normal session
runs them in a fresh process with ``TRITON_INTERPRET=1`` (``test_kernel_tests_pass_under_the_interpreter``); there
a kernel error is a failure, and so is a run in which no kernel case passed. Triton comes with the ``test`` extra
(the version the pinned torch declares); without it only the PyTorch-path tests run here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_config
from pipeline.hf_modeling import router_kernel
from pipeline.hf_modeling.modeling_layermoe import LayerMoEBlock, RoutingContext
from pipeline.hf_modeling.router_kernel import BACKEND_ENV, route

EXACT = ("indices", "router_indices", "counts", "offsets", "assign_counts")
CLOSE = ("weights", "router_weights", "probs", "prob_sums")  # also the differentiable outputs
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu")  # where kernels run
KERNEL_MARKS = (pytest.mark.triton_interpreter,
                pytest.mark.skipif(not INTERPRETED and DEVICE.type != "cuda", reason="no GPU: runs in a "
                                   "TRITON_INTERPRET=1 process, see test_kernel_tests_pass_under_the_interpreter"))


def interpreted_only(test):
    """A kernel test: it runs on a GPU, or in the interpreter process."""
    for mark in KERNEL_MARKS:
        test = mark(test)
    return test


@pytest.mark.skipif(INTERPRETED, reason="this is the interpreter process")
def test_kernel_tests_pass_under_the_interpreter():
    if router_kernel.triton is None:
        pytest.skip("triton is not installed (it comes with the test extra: pip install -e '.[test]')")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-rs", "-p", "no:cacheprovider", "-m",
                           "triton_interpreter", __file__], cwd=Path(__file__).parent.parent, env=env,
                          capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    summary = output.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) > 0, f"no kernel case passed under the interpreter: {summary}"
    assert not re.search(r"skipped|failed|error", summary), f"every kernel case must run: {summary}\n{output[-3000:]}"


def logits_with_ties(n: int, e: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Half the rows continuous, half drawn from {0, 1, 2} (many exact ties), one row all equal."""
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(n, e, generator=g)
    logits[n // 2:] = torch.randint(0, 3, (n - n // 2, e), generator=g).float()
    logits[0] = 1.0
    return logits.to(DEVICE, dtype)


def run(backend: str, logits: torch.Tensor, k: int, gate, valid, monkeypatch):
    """Route with ``backend``; backpropagate a fixed random linear function of every differentiable output."""
    monkeypatch.setenv(BACKEND_ENV, backend)
    z = logits.clone().requires_grad_(True)
    result = route(z, k, gate, valid)
    g = torch.Generator().manual_seed(123)
    loss = sum((getattr(result, f) * torch.randn(getattr(result, f).shape, generator=g).to(DEVICE)).sum()
               for f in CLOSE)
    loss.backward()
    return result, z.grad


@interpreted_only
@pytest.mark.parametrize("experts, k", [(2, 1), (2, 2), (3, 1), (3, 2), (5, 1), (5, 2), (6, 2), (7, 1), (7, 2),
                                        (64, 1), (64, 2), (5, 4), (7, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated", [False, True])
def test_kernel_matches_reference(monkeypatch, experts, k, dtype, gated):
    n = 150  # not a multiple of the block
    logits = logits_with_ties(n, experts, dtype, seed=experts * 10 + k)
    g = torch.Generator().manual_seed(1)
    gate = (torch.rand(n, generator=g) < 0.3).to(DEVICE) if gated else None
    valid = (torch.rand(n, generator=g) < 0.8).to(DEVICE) if gated else None
    expected, expected_grad = run("torch", logits, k, gate, valid, monkeypatch)
    got, got_grad = run("triton", logits, k, gate, valid, monkeypatch)
    for field in EXACT:
        assert torch.equal(getattr(got, field), getattr(expected, field)), field
    for field in CLOSE:
        torch.testing.assert_close(getattr(got, field), getattr(expected, field), atol=1e-5, rtol=1e-5, msg=field)
    assert got_grad.dtype == dtype
    torch.testing.assert_close(got_grad, expected_grad, **({} if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=KERNEL_MARKS)])
def test_ties_pick_the_lowest_index_and_gated_rows_follow_the_convention(monkeypatch, backend):
    monkeypatch.setenv(BACKEND_ENV, backend)
    device = DEVICE if backend == "triton" else "cpu"
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 2.0, 2.0], [5.0, 5.0, 1.0, 5.0], [0.0, 3.0, 1.0, 3.0]],
                          device=device)
    gate = torch.tensor([False, False, False, True], device=device)
    valid = torch.tensor([True, True, False, True], device=device)
    r = route(logits, 2, gate, valid)
    assert r.router_indices.tolist() == [[0, 1], [1, 2], [0, 1], [1, 3]]
    assert r.indices.tolist() == [[0, 1], [1, 2], [0, 1], [0, 4]]  # gated: expert 0, then an inactive slot (E)
    assert r.weights[3].tolist() == [1.0, 0.0]
    assert r.counts.tolist() == [3, 3, 1, 0] and r.offsets.tolist() == [0, 3, 6, 7, 7]
    assert r.assign_counts.tolist() == [1, 2, 1, 0]  # rows 0 and 1 only: row 2 is padding, row 3 is gated
    torch.testing.assert_close(r.prob_sums, r.probs[:2].sum(0))


@interpreted_only
def test_block_output_and_gradients_agree_between_backends(monkeypatch):
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(tiny_config("llama", layers=1))
    context = RoutingContext()
    block = LayerMoEBlock(dense.model.layers[0].mlp, 5, 32, 2, classifier=True, context=context).to(DEVICE)
    with torch.no_grad():
        for expert in list(block.experts)[1:]:
            for p in expert.parameters():
                p.add_(0.2 * torch.randn_like(p))
        block.classifier.weight.normal_()
    x = torch.randn(3, 11, 32).to(DEVICE)
    context.attention_mask = torch.ones(3, 11, dtype=torch.long, device=DEVICE)
    outputs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv(BACKEND_ENV, backend)
        block.zero_grad()
        y = block(x)
        (y.square().sum() + block.last_routing.router_logits.logsumexp(-1).sum()).backward()
        outputs[backend] = (y.detach(), block.router.weight.grad.clone(), block.experts[3].up_proj.weight.grad.clone())
    assert block.last_routing.sent_to_original.any() and not block.last_routing.sent_to_original.all()
    for got, expected in zip(outputs["triton"], outputs["torch"]):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(INTERPRETED, reason="the interpreter replaces the compiler")
def test_kernels_compile_for_a_gpu():
    """Without a GPU the interpreter cannot catch compile-only errors: build PTX and a cubin for sm_90."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        pytest.skip(f"this triton has no offline compiler API: {e}")
    pointers = {
        router_kernel._route_forward_kernel: "*bf16 *i8 *i8 *fp32 *fp32 *i64 *fp32 *i64 *i32 *i32 *fp32",
        router_kernel._route_backward_kernel: "*fp32 *i64 *i8 *i8 *fp32 *fp32 *fp32 *fp32 *bf16",
    }
    constants = dict(E=6, K=2, BLOCK_N=128, BLOCK_E=8, BLOCK_K=2, HAS_GATE=True, HAS_VALID=True)
    for fn, types in pointers.items():
        kernel = triton.jit(fn)
        signature = dict(zip(kernel.arg_names, types.split() + ["i32"] + ["constexpr"] * len(constants)))
        try:
            compiled = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32))
        except (RuntimeError, FileNotFoundError) as e:
            if "ptxas" in str(e).lower():
                pytest.skip(f"no ptxas: {e}")
            raise
        assert compiled.asm["cubin"]
