"""The LayerMoE model: a dense HF causal LM whose FFNs are replaced by dropless top-k mixtures of experts.

This file is copied into every saved checkpoint, so it imports nothing from the ``pipeline`` package.

* ``LayerMoEBlock`` keeps the FFN contract (``[batch, seq, hidden]`` in and out). Expert 0 is the original FFN
  module; the router is ``Linear(hidden, E, bias=False)`` evaluated in fp32; top-k weights are renormalised.
  Tokens are grouped by expert (one gather, one scatter-add) and each expert runs once on its contiguous slice.
* In classifier layers a ``Linear(hidden, 2, bias=False)`` on pooled FFN inputs makes a hard old/new decision:
  "old" tokens go to expert 0 alone with weight exactly 1, "new" tokens are routed normally. Only the branch a
  token needs is computed. The classifiers act only while ``config.classifiers_active`` is set (from training
  stage 2 on); otherwise they are not evaluated and every layer routes top-k over all its experts.
* Per-forward routing data (router logits, chosen experts, classifier logits and decisions) is kept in
  ``block.last_routing`` for losses and statistics; HF ``forward``/``generate`` are untouched.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel

# relative imports only: transformers copies these files into a package of their own when it loads a checkpoint
# with trust_remote_code (before 4.51 it took any import outside a try block for a package to install)
from .configuration_layermoe import LayerMoEConfig
from .router_kernel import RouteResult, route

OLD, NEW = 0, 1  # classifier classes


@dataclass
class RoutingRecord:
    """What one MoE block decided in the last forward; token dimension = flattened ``batch * seq``."""

    router_logits: torch.Tensor  # [N, E] fp32
    expert_indices: torch.Tensor  # [N, k] top-k experts (before any classifier override)
    expert_weights: torch.Tensor  # [N, k] renormalised top-k weights
    valid: torch.Tensor  # [N] bool: not padding
    classifier_logits: torch.Tensor | None = None  # [N, 2] fp32
    sent_to_original: torch.Tensor | None = None  # [N] bool: classifier said "old"


class RoutingContext:
    """Per-forward facts a block cannot see in its input tensor: which positions are padding, and whether this
    forward continues a cached sequence. Set by a pre-hook on the decoder; shared by all blocks of a model."""

    def __init__(self) -> None:
        self.attention_mask: torch.Tensor | None = None
        self.continues: bool = False

    def valid_mask(self, batch: int, seq: int, device: torch.device) -> torch.Tensor:
        mask = self.attention_mask
        if mask is None or mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] < seq:
            return torch.ones(batch, seq, dtype=torch.bool, device=device)
        return mask[:, -seq:].to(device=device, dtype=torch.bool)


CPU_ROW_MULTIPLE = 128  # expert batches on CPU in bf16/fp16 are padded to a multiple of this many rows


def run_expert(expert: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """``expert(rows)``. On CPU in bf16/fp16 the rows are first padded with zeros to a multiple of
    ``CPU_ROW_MULTIPLE`` (the output is cut back): oneDNN compiles and keeps kernels for every new row count, and
    an expert's row count changes every step, so without padding a training process kept growing (a 6-layer model,
    3 experts per layer: 580 -> 1690 MiB over 60 steps); with few distinct counts it stays flat. Zero rows change
    neither the real rows' outputs nor any gradient (their outputs are dropped)."""
    count = rows.shape[0]
    pad = -count % CPU_ROW_MULTIPLE
    if rows.device.type != "cpu" or rows.dtype not in (torch.bfloat16, torch.float16) or not pad:
        return expert(rows)
    return expert(torch.cat([rows, rows.new_zeros(pad, *rows.shape[1:])]))[:count]


def grouped_expert_forward(x: torch.Tensor, experts: nn.ModuleList, routing: RouteResult) -> torch.Tensor:
    """``y[t] = sum over active slots j of weights[t, j] * experts[indices[t, j]](x[t])``, dropless.

    The slots are sorted by expert (stable; inactive slots, index E, sort last and are cut off), the tokens
    gathered once, expert e applied to its contiguous slice ``offsets[e]:offsets[e + 1]`` of the router's
    counts, and the weighted outputs scatter-added back. ``x``: [N, h].
    """
    k = routing.indices.shape[1]
    offsets = routing.offsets.tolist()
    order = torch.argsort(routing.indices.reshape(-1), stable=True)[:offsets[-1]]
    tokens = order // k
    gathered = x[tokens]
    spans = enumerate(zip(offsets, offsets[1:]))
    # while training, an expert with no tokens still runs (on an empty slice) so that its parameters get a
    # (zero) gradient on every rank: data-parallel gradient reduction needs the same tensors everywhere
    outputs = [run_expert(experts[e], gathered[start:end]) for e, (start, end) in spans
               if end > start or torch.is_grad_enabled()]
    if not outputs:
        return torch.zeros_like(x)
    weighted = torch.cat(outputs) * routing.weights.reshape(-1)[order].unsqueeze(-1).to(x.dtype)
    return torch.zeros_like(x).index_add_(0, tokens, weighted)


class LayerMoEBlock(nn.Module):
    """A decoder layer's FFN as a mixture of experts (see the module docstring)."""

    def __init__(self, original_ffn: nn.Module, num_experts: int, hidden_size: int, top_k: int = 2,
                 classifier: bool = False, pooling: str = "prefix", context: RoutingContext | None = None,
                 classifier_active: bool = True):
        super().__init__()
        if num_experts < 2:
            raise ValueError(f"an MoE block needs >= 2 experts, got {num_experts}")
        if pooling not in ("prefix", "sequence"):
            raise ValueError(f"pooling must be 'prefix' or 'sequence', got {pooling!r}")
        self.experts = nn.ModuleList([original_ffn] + [copy.deepcopy(original_ffn) for _ in range(num_experts - 1)])
        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        self.classifier = nn.Linear(hidden_size, 2, bias=False) if classifier else None
        self.classifier_active = classifier_active  # False: the classifier is not evaluated, routing is plain top-k
        self.top_k = min(top_k, num_experts)
        self.pooling = pooling
        self.context = context or RoutingContext()
        self.last_routing: RoutingRecord | None = None
        self._prefix_state: tuple[torch.Tensor, torch.Tensor] | None = None
        nn.init.xavier_normal_(self.router.weight)
        if self.classifier is not None:
            nn.init.xavier_normal_(self.classifier.weight)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def dispatch(self, x: torch.Tensor, routing: RouteResult) -> torch.Tensor:
        """Run the experts on the routed rows (``pipeline.expert_parallel.shard_block`` replaces this per block)."""
        return grouped_expert_forward(x, self.experts, routing)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 router logits ``[N, E]`` for flattened inputs ``[N, h]``."""
        return F.linear(x.float(), self.router.weight.float())

    def pooled_inputs(self, hidden_states: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """What the classifier sees for each position, fp32 ``[B, T, h]``; padding never contributes."""
        x = hidden_states.float() * valid.unsqueeze(-1)
        if self.pooling == "sequence":
            return x.sum(dim=1, keepdim=True).expand_as(x)
        sums = x.cumsum(dim=1)
        counts = valid.float().cumsum(dim=1)
        if self.context.continues and self._prefix_state is not None and self._prefix_state[0].shape[0] == x.shape[0]:
            sums = sums + self._prefix_state[0].unsqueeze(1)
            counts = counts + self._prefix_state[1].unsqueeze(1)
        self._prefix_state = (sums[:, -1].detach(), counts[:, -1].detach())
        return sums / counts.clamp(min=1).unsqueeze(-1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = hidden_states.shape
        x = hidden_states.reshape(-1, hidden)
        valid = self.context.valid_mask(batch, seq, hidden_states.device)
        router_logits = self.router_logits(x)
        classifier_logits = to_original = None
        if self.classifier is not None and self.classifier_active:
            pooled = self.pooled_inputs(hidden_states, valid).reshape(-1, hidden)
            classifier_logits = F.linear(pooled, self.classifier.weight.float())
            to_original = classifier_logits.argmax(dim=-1) == OLD
        routing = route(router_logits, self.top_k, to_original, valid.reshape(-1))
        y = self.dispatch(x, routing)
        self.last_routing = RoutingRecord(router_logits, routing.router_indices, routing.router_weights,
                                          valid.reshape(-1), classifier_logits, to_original)
        return y.reshape(batch, seq, hidden)


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder (``.model`` holding ``.layers``) of a dense or LayerMoE causal LM."""
    inner = model.base if isinstance(model, LayerMoEForCausalLM) else model
    return inner.model


def output_logits(model: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """The logits a dense or LayerMoE causal LM computes from its decoder's last hidden states (the LM head, and
    the final logit soft-capping of architectures that have one, e.g. Gemma)."""
    inner = model.base if isinstance(model, LayerMoEForCausalLM) else model
    logits = inner.lm_head(hidden_states)
    cap = getattr(inner.config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


def moe_blocks(model: nn.Module) -> dict[int, LayerMoEBlock]:
    """Layer index -> MoE block, for the layers that have one."""
    return {i: layer.mlp for i, layer in enumerate(decoder_of(model).layers) if isinstance(layer.mlp, LayerMoEBlock)}


class LayerMoEForCausalLM(PreTrainedModel, GenerationMixin):
    """A base-architecture causal LM (``self.base``) whose FFNs are ``LayerMoEBlock``s as the config says."""

    config_class = LayerMoEConfig
    base_model_prefix = "base"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def __init__(self, config: LayerMoEConfig):
        super().__init__(config)
        base_config = config.base()
        self.base = AutoModelForCausalLM.from_config(base_config)
        layers = self.base.model.layers
        if len(config.experts_per_layer) != len(layers):
            raise ValueError(f"config has experts for {len(config.experts_per_layer)} layers, the base model has {len(layers)}")
        self.routing_context = RoutingContext()
        for i, layer in enumerate(layers):
            if config.experts_per_layer[i] > 1:
                layer.mlp = LayerMoEBlock(layer.mlp, config.experts_per_layer[i], base_config.hidden_size, config.num_experts_per_tok,
                                          i in config.classifier_layers, config.pooling, self.routing_context,
                                          config.classifiers_active)
        self.base.model.register_forward_pre_hook(self._set_routing_context, with_kwargs=True)
        self.post_init()

    def set_classifiers_active(self, active: bool) -> None:
        """Let the routing classifiers act (True, from training stage 2 on) or not (stage 1); saved in config.json."""
        self.config.classifiers_active = active
        for layer in self.base.model.layers:
            if isinstance(layer.mlp, LayerMoEBlock):
                layer.mlp.classifier_active = active

    def _set_routing_context(self, module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers renamed it to `cache`
        self.routing_context.attention_mask = kwargs.get("attention_mask")
        self.routing_context.continues = cache is not None and cache.get_seq_length() > 0

    def _init_weights(self, module):
        if isinstance(module, LayerMoEBlock):
            nn.init.xavier_normal_(module.router.weight)
            if module.classifier is not None:
                nn.init.xavier_normal_(module.classifier.weight)
        elif hasattr(self.base, "_init_weights"):
            self.base._init_weights(module)

    def get_input_embeddings(self):
        return self.base.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.base.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.base.get_output_embeddings()

    def get_decoder(self):
        return self.base.model

    def forward(self, *args, hidden_states_only: bool = False, **kwargs):
        """The base model's forward; with ``hidden_states_only`` the decoder's output (``last_hidden_state``)
        without the LM head, for losses that apply the head themselves (chunked cross-entropy)."""
        if hidden_states_only:
            return self.base.model(*args, **kwargs)
        return self.base(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base.generate(*args, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Like ``PreTrainedModel.from_pretrained``, but missing or unexpected tensors are an error."""
        wants_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except RuntimeError as e:
            if "mismatched" not in str(e):
                raise
            raise ValueError(f"checkpoint does not match its config.json: tensor shapes differ ({e})") from e
        # a tied tensor is saved once (the base's lm_head = its embeddings); transformers before 5 neither ties the
        # inner model's tensors when loading this wrapper nor drops the name the tensor was not saved under
        missing = set(info.get("missing_keys", ()))
        if missing and getattr(model.base.config, "tie_word_embeddings", False):
            model.base.tie_weights()
        parameters = dict(model.named_parameters(remove_duplicate=False))
        loaded = {id(p) for name, p in parameters.items() if name not in missing}
        info["missing_keys"] = [k for k in missing if id(parameters.get(k)) not in loaded]
        problems = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if problems:
            raise ValueError(f"checkpoint does not match its config.json: {problems}")
        return (model, info) if wants_info else model
