"""Top-k routing for LayerMoE blocks: softmax, top-k, renormalisation, the classifier override and the per-expert
statistics in one call, with a reference PyTorch path and a fused Triton kernel behind the same function.

This file is copied into every saved checkpoint next to ``modeling_layermoe.py``: it imports only torch (and
triton when importable), never the ``pipeline`` package.

Conventions (both backends):

* Ties: among equal probabilities the lowest expert index wins (``torch.topk`` does not promise that, so the
  reference path uses a stable sort).
* Rows sent to the original expert by the classifier (``send_to_original``) are dispatched to expert 0 with
  weight exactly 1 in slot 0; their other slots are inactive: index ``E`` (one past the last expert) and
  weight 0. Sorting the dispatch indices therefore puts every inactive slot after all real assignments.
* ``counts``/``offsets`` describe the dispatch (what ``indices`` holds, inactive slots excluded); the balance
  statistics ``assign_counts``/``prob_sums`` count only rows that are routed (not sent to the original) and
  valid (not padding): for those ``R = assign_counts.sum() / k`` rows, ``f_e = assign_counts / (R k)`` and
  ``P_e = prob_sums / R``.
* Backend: ``LAYERMOE_ROUTER_BACKEND=torch|triton`` forces one (``triton`` on CPU needs ``TRITON_INTERPRET=1``);
  otherwise Triton for CUDA tensors when triton imports, PyTorch elsewhere. The kernel handles up to
  ``MAX_KERNEL_EXPERTS`` experts; more use the PyTorch path.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch path needs no triton
    triton = tl = None

BACKEND_ENV = "LAYERMOE_ROUTER_BACKEND"
MAX_KERNEL_EXPERTS = 64
_announced: set[str] = set()


@dataclass
class RouteResult:
    """The routing of ``N`` rows over ``E`` experts with ``k`` slots per row (see the module docstring)."""

    weights: torch.Tensor  # [N, k] fp32 dispatch weights (classifier override applied)
    indices: torch.Tensor  # [N, k] int64 dispatch experts; E marks an inactive slot
    router_weights: torch.Tensor  # [N, k] fp32 the router's own renormalised top-k (before the override)
    router_indices: torch.Tensor  # [N, k] int64
    probs: torch.Tensor  # [N, E] fp32 softmax of the logits
    counts: torch.Tensor  # [E] int64 dispatched assignments per expert
    offsets: torch.Tensor  # [E + 1] int64 exclusive prefix sum of counts: expert e's slice in dispatch order
    prob_sums: torch.Tensor  # [E] fp32 sum of probs over balance rows (differentiable)
    assign_counts: torch.Tensor  # [E] int64 top-k assignments of balance rows


def route(router_logits: torch.Tensor, k: int, send_to_original: torch.Tensor | None = None,
          valid: torch.Tensor | None = None) -> RouteResult:
    """Route ``router_logits [N, E]`` (fp32/bf16/fp16) to ``k`` experts per row. ``send_to_original [N]`` bool:
    rows the classifier sends to expert 0 alone; ``valid [N]`` bool: rows that count in the balance statistics
    (default all). ``weights``, ``router_weights``, ``probs`` and ``prob_sums`` are differentiable."""
    if router_logits.dim() != 2:
        raise ValueError(f"router logits must be [tokens, experts], got shape {tuple(router_logits.shape)}")
    n, e = router_logits.shape
    if not 1 <= k <= e:
        raise ValueError(f"top-k must be in 1..{e} for {e} experts, got {k}")
    if _backend(router_logits) == "triton" and n > 0 and e <= MAX_KERNEL_EXPERTS:
        return _route_triton(router_logits, k, send_to_original, valid)
    return _route_torch(router_logits, k, send_to_original, valid)


def _backend(logits: torch.Tensor) -> str:
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced not in ("", "torch", "triton"):
        raise ValueError(f"{BACKEND_ENV} must be 'torch' or 'triton', got {forced!r}")
    if forced == "triton" and triton is None:
        raise RuntimeError(f"{BACKEND_ENV}=triton but triton cannot be imported")
    name = forced or ("triton" if logits.is_cuda and triton is not None else "torch")
    if name not in _announced:
        _announced.add(name)
        if os.environ.get("RANK", "0") == "0":  # the format of pipeline/log.py (this file imports nothing from it)
            print(f"[layermoe {time.strftime('%H:%M:%S')}] router backend: {name}", file=sys.stderr, flush=True)
    return name


def _balance_rows(n: int, send_to_original: torch.Tensor | None, valid: torch.Tensor | None,
                  device: torch.device) -> torch.Tensor:
    rows = torch.ones(n, dtype=torch.bool, device=device) if valid is None else valid.to(torch.bool)
    return rows if send_to_original is None else rows & ~send_to_original.to(torch.bool)


def _route_torch(logits: torch.Tensor, k: int, send_to_original: torch.Tensor | None,
                 valid: torch.Tensor | None) -> RouteResult:
    """The reference: plain PyTorch ops, autograd for the backward."""
    n, e = logits.shape
    probs = torch.softmax(logits.float(), dim=-1)
    top, router_indices = torch.sort(probs, dim=-1, descending=True, stable=True)
    top, router_indices = top[:, :k], router_indices[:, :k]
    router_weights = top / top.sum(dim=-1, keepdim=True)
    weights, indices = router_weights, router_indices
    if send_to_original is not None:
        first = torch.arange(k, device=logits.device) == 0
        gated = send_to_original.to(torch.bool).unsqueeze(1)
        weights = torch.where(gated, first.float(), router_weights)
        indices = torch.where(gated, torch.where(first, 0, e), router_indices)
    counts = torch.bincount(indices.reshape(-1), minlength=e + 1)[:e]
    balance = _balance_rows(n, send_to_original, valid, logits.device)
    assign_counts = torch.zeros(e, dtype=torch.int64, device=logits.device).index_add_(
        0, router_indices.reshape(-1), balance.long().repeat_interleave(k))
    prob_sums = (probs * balance.unsqueeze(1)).sum(dim=0)
    return RouteResult(weights, indices, router_weights, router_indices, probs, counts,
                       F.pad(counts.cumsum(0), (1, 0)), prob_sums, assign_counts)


def _route_triton(logits: torch.Tensor, k: int, send_to_original: torch.Tensor | None,
                  valid: torch.Tensor | None) -> RouteResult:
    gate = None if send_to_original is None else send_to_original.to(torch.int8).contiguous()
    keep = None if valid is None else valid.to(torch.int8).contiguous()
    out = _TritonRoute.apply(logits.contiguous(), k, gate, keep)
    if gate is None:
        probs, weights, prob_sums, indices, counts, assign_counts = out
        router_weights, router_indices = weights, indices
    else:
        probs, weights, prob_sums, router_weights, indices, router_indices, counts, assign_counts = out
    counts, assign_counts = counts.long(), assign_counts.long()
    return RouteResult(weights, indices, router_weights, router_indices, probs, counts,
                       F.pad(counts.cumsum(0), (1, 0)), prob_sums, assign_counts)


def _blocks(e: int, k: int) -> tuple[int, int, int]:
    """(rows, experts, slots) per program: about 4096 elements of the backward's [rows, slots, experts] tile."""
    block_e, block_k = triton.next_power_of_2(e), triton.next_power_of_2(k)
    return max(16, min(128, 4096 // (block_e * block_k))), block_e, block_k


class _TritonRoute(torch.autograd.Function):
    """Forward and backward kernels; outputs: probs, weights, prob_sums, [router_weights,] then the integer ones."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, k: int, gate: torch.Tensor | None, keep: torch.Tensor | None):
        n, e = logits.shape
        device = logits.device
        probs = torch.empty(n, e, dtype=torch.float32, device=device)
        weights = torch.empty(n, k, dtype=torch.float32, device=device)
        indices = torch.empty(n, k, dtype=torch.int64, device=device)
        router_weights = torch.empty_like(weights) if gate is not None else weights
        router_indices = torch.empty_like(indices) if gate is not None else indices
        counts = torch.zeros(e, dtype=torch.int32, device=device)
        assign_counts = torch.zeros_like(counts)
        prob_sums = torch.zeros(e, dtype=torch.float32, device=device)
        block_n, block_e, block_k = _blocks(e, k)
        forward_kernel, _ = _kernels()
        forward_kernel[(triton.cdiv(n, block_n),)](
            logits, probs if gate is None else gate, probs if keep is None else keep, probs, weights, indices,
            router_weights, router_indices, counts, assign_counts, prob_sums, n, E=e, K=k, BLOCK_N=block_n,
            BLOCK_E=block_e, BLOCK_K=block_k, HAS_GATE=gate is not None, HAS_VALID=keep is not None)
        ctx.save_for_backward(probs, router_indices, gate, keep)
        ctx.logits_dtype = logits.dtype
        ctx.mark_non_differentiable(indices, router_indices, counts, assign_counts)
        if gate is None:
            return probs, weights, prob_sums, indices, counts, assign_counts
        return probs, weights, prob_sums, router_weights, indices, router_indices, counts, assign_counts

    @staticmethod
    def backward(ctx, grad_probs: torch.Tensor, grad_weights: torch.Tensor, grad_prob_sums: torch.Tensor, *rest):
        probs, router_indices, gate, keep = ctx.saved_tensors
        n, e = probs.shape
        k = router_indices.shape[1]
        grad_router_weights = rest[0].contiguous() if gate is not None else grad_weights
        grad_logits = torch.empty(n, e, dtype=ctx.logits_dtype, device=probs.device)
        block_n, block_e, block_k = _blocks(e, k)
        _, backward_kernel = _kernels()
        backward_kernel[(triton.cdiv(n, block_n),)](
            probs, router_indices, probs if gate is None else gate, probs if keep is None else keep,
            grad_probs.contiguous(), grad_weights.contiguous(), grad_router_weights, grad_prob_sums.contiguous(),
            grad_logits, n, E=e, K=k, BLOCK_N=block_n, BLOCK_E=block_e, BLOCK_K=block_k,
            HAS_GATE=gate is not None, HAS_VALID=keep is not None)
        return grad_logits, None, None, None


@functools.cache
def _kernels():
    """JIT the kernels on first use, so that ``TRITON_INTERPRET`` set before then (e.g. by a test) takes effect."""
    return triton.jit(_route_forward_kernel), triton.jit(_route_backward_kernel)


def _route_forward_kernel(logits_ptr, gate_ptr, valid_ptr, probs_ptr, weights_ptr, indices_ptr, router_weights_ptr,
                          router_indices_ptr, counts_ptr, assign_ptr, prob_sums_ptr, n_rows,
                          E: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                          BLOCK_K: tl.constexpr, HAS_GATE: tl.constexpr, HAS_VALID: tl.constexpr):
    """One block of rows: fp32 softmax, top-K by repeated arg-max (lowest index on ties), renormalisation, the
    classifier override, and per-expert counts and probability sums added atomically."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_E)
    slots = tl.arange(0, BLOCK_K)
    row_ok = rows < n_rows
    col_ok = cols < E
    tile = row_ok[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * E + cols[None, :]
    z = tl.load(logits_ptr + offs, mask=tile, other=0.0).to(tl.float32)
    z = tl.where(col_ok[None, :], z, float("-inf"))
    ex = tl.exp(z - tl.max(z, axis=1)[:, None])
    probs = ex / tl.sum(ex, axis=1)[:, None]
    tl.store(probs_ptr + offs, probs, mask=tile)

    candidates = tl.where(col_ok[None, :], probs, -1.0)
    top_p = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    top_i = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(K):
        best = tl.argmax(candidates, axis=1, tie_break_left=True)
        top_p = tl.where(slots[None, :] == j, tl.max(candidates, axis=1)[:, None], top_p)
        top_i = tl.where(slots[None, :] == j, best[:, None], top_i)
        candidates = tl.where(cols[None, :] == best[:, None], -2.0, candidates)
    chosen = candidates == -2.0
    router_w = top_p / tl.sum(top_p, axis=1)[:, None]

    balance = row_ok
    if HAS_VALID:
        balance = balance & (tl.load(valid_ptr + rows, mask=row_ok, other=0) != 0)
    slot_offs = rows.to(tl.int64)[:, None] * K + slots[None, :]
    slot_ok = row_ok[:, None] & (slots[None, :] < K)
    if HAS_GATE:
        gated = tl.load(gate_ptr + rows, mask=row_ok, other=0) != 0
        balance = balance & (gated == 0)
        first = slots[None, :] == 0
        weights = tl.where(gated[:, None], tl.where(first, 1.0, 0.0), router_w)
        indices = tl.where(gated[:, None], tl.where(first, 0, E), top_i)
        dispatched = tl.where(gated[:, None], cols[None, :] == 0, chosen)
        tl.store(router_weights_ptr + slot_offs, router_w, mask=slot_ok)
        tl.store(router_indices_ptr + slot_offs, top_i.to(tl.int64), mask=slot_ok)
    else:
        weights, indices, dispatched = router_w, top_i, chosen
    tl.store(weights_ptr + slot_offs, weights, mask=slot_ok)
    tl.store(indices_ptr + slot_offs, indices.to(tl.int64), mask=slot_ok)
    tl.atomic_add(counts_ptr + cols, tl.sum((dispatched & row_ok[:, None]).to(tl.int32), axis=0), mask=col_ok)
    tl.atomic_add(assign_ptr + cols, tl.sum((chosen & balance[:, None]).to(tl.int32), axis=0), mask=col_ok)
    tl.atomic_add(prob_sums_ptr + cols, tl.sum(tl.where(balance[:, None], probs, 0.0), axis=0), mask=col_ok)


def _route_backward_kernel(probs_ptr, router_indices_ptr, gate_ptr, valid_ptr, grad_probs_ptr, grad_weights_ptr,
                           grad_router_weights_ptr, grad_prob_sums_ptr, grad_logits_ptr, n_rows,
                           E: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                           BLOCK_K: tl.constexpr, HAS_GATE: tl.constexpr, HAS_VALID: tl.constexpr):
    """d logits from the gradients of probs, weights (dispatch and router's own) and prob_sums, for one block."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_E)
    slots = tl.arange(0, BLOCK_K)
    row_ok = rows < n_rows
    col_ok = cols < E
    tile = row_ok[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * E + cols[None, :]
    slot_offs = rows.to(tl.int64)[:, None] * K + slots[None, :]
    slot_ok = row_ok[:, None] & (slots[None, :] < K)
    p = tl.load(probs_ptr + offs, mask=tile, other=0.0)
    idx = tl.load(router_indices_ptr + slot_offs, mask=slot_ok, other=-1).to(tl.int32)
    grad_w = tl.load(grad_weights_ptr + slot_offs, mask=slot_ok, other=0.0)

    balance = row_ok
    if HAS_VALID:
        balance = balance & (tl.load(valid_ptr + rows, mask=row_ok, other=0) != 0)
    if HAS_GATE:  # the override's weights are constants: only the router's own weights carry gradient there
        gated = tl.load(gate_ptr + rows, mask=row_ok, other=0) != 0
        balance = balance & (gated == 0)
        grad_w = tl.where(gated[:, None], 0.0, grad_w)
        grad_w += tl.load(grad_router_weights_ptr + slot_offs, mask=slot_ok, other=0.0)

    hit = idx[:, :, None] == cols[None, None, :]  # [rows, slots, experts]
    top_p = tl.sum(tl.where(hit, p[:, None, :], 0.0), axis=2)
    total = tl.where(row_ok, tl.sum(top_p, axis=1), 1.0)
    w = top_p / total[:, None]
    grad_top = (grad_w - tl.sum(grad_w * w, axis=1)[:, None]) / total[:, None]
    grad_p = tl.load(grad_probs_ptr + offs, mask=tile, other=0.0)
    grad_p += tl.sum(tl.where(hit, grad_top[:, :, None], 0.0), axis=1)
    grad_sums = tl.load(grad_prob_sums_ptr + cols, mask=col_ok, other=0.0)
    grad_p += tl.where(balance[:, None], grad_sums[None, :], 0.0)
    grad_z = p * (grad_p - tl.sum(grad_p * p, axis=1)[:, None])
    tl.store(grad_logits_ptr + offs, grad_z.to(grad_logits_ptr.dtype.element_ty), mask=tile)
