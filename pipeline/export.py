"""Exporting a model as a self-contained HF directory (weights, config, tokenizer; for an expanded model also its
modeling code).

Not to be confused with ``training_checkpoint.py`` (DeepSpeed checkpoints to resume a training stage)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError

from pipeline.atomic import atomic_directory, cannot_write, read_json, write_json
from pipeline.hf_modeling.modeling_layermoe import LayerMoEForCausalLM
from pipeline.token_store import TOKENIZER_FILES as ENCODING_FILES

MODELING_DIR = Path(__file__).parent / "hf_modeling"
MODELING_FILES = ("configuration_layermoe.py", "modeling_layermoe.py", "router_kernel.py")
# every file that decides how the tokenizer encodes text (so a later round finds the token stores of this one), and
# the prompt and generation settings
TOKENIZER_FILES = (*ENCODING_FILES, "chat_template.jinja", "generation_config.json")


def export_model(model: torch.nn.Module, out_dir: Path, tokenizer_from: Path | None = None) -> Path:
    """Write ``model`` to ``out_dir`` atomically, readable as the umask allows: safetensors weights, config.json,
    the tokenizer files found in ``tokenizer_from`` (as they are); for an expanded model also ``auto_map`` in
    config.json (with the rotary keys older transformers read) and the modeling code (so
    ``AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)`` works without this package). A
    dense model (the dense baselines) is saved as the plain HF model it is. A failed write is an error naming it."""
    expanded = isinstance(model, LayerMoEForCausalLM)
    if expanded:
        model.config.auto_map = {"AutoConfig": "configuration_layermoe.LayerMoEConfig",
                                 "AutoModelForCausalLM": "modeling_layermoe.LayerMoEForCausalLM"}
        model.config.architectures = ["LayerMoEForCausalLM"]
        model.config.base_config = with_legacy_rope_keys(model.config.base_config)
    try:
        with atomic_directory(Path(out_dir)) as tmp:
            model.save_pretrained(tmp)
            for name in MODELING_FILES if expanded else ():
                shutil.copyfile(MODELING_DIR / name, tmp / name)
            if tokenizer_from is not None:
                for name in TOKENIZER_FILES:
                    if (Path(tokenizer_from) / name).is_file() and not (tmp / name).exists():
                        shutil.copyfile(Path(tokenizer_from) / name, tmp / name)
    except (OSError, RuntimeError, SafetensorError) as e:  # e.g. a full disk; nothing of out_dir changed
        raise cannot_write(out_dir, e) from None
    return Path(out_dir)


def make_tokenizer_portable(model_dir: Path) -> None:
    """Rewrite a model directory's tokenizer_config.json with :func:`portable_tokenizer_config` (the export stage's
    copy only: the stages' own models keep the tokenizer files byte for byte, which the token stores check)."""
    path = Path(model_dir) / "tokenizer_config.json"
    if path.is_file():
        write_json(path, portable_tokenizer_config(read_json(path, "tokenizer config"),
                                                   (Path(model_dir) / "tokenizer.json").is_file()))


def with_legacy_rope_keys(base_config: dict) -> dict:
    """The base architecture's config with its rotary-embedding settings also under the keys transformers 4 reads
    (``rope_theta``, ``rope_scaling``): transformers 5 keeps them in ``rope_parameters``, which 4.x ignores (it
    would build the model with its default base frequency and silently compute something else). A per-layer-type
    ``rope_parameters`` (Gemma 3) is left as it is."""
    rope = base_config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope:
        return base_config
    legacy = {"rope_theta": rope["rope_theta"]}
    if rope.get("rope_type", "default") != "default":
        legacy["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return {**base_config, **legacy}


def portable_tokenizer_config(tokenizer_config: dict, has_tokenizer_json: bool) -> dict:
    """tokenizer_config.json as every supported transformers version reads it with ``AutoTokenizer``: no
    ``auto_map`` (the tokenizer needs no custom code; transformers 5 still reads config.json's and asks about the
    model's code on a terminal unless given ``trust_remote_code=False``), and a tokenizer class that exists in transformers 4 too
    (transformers 5 writes ``TokenizersBackend``, a class 4.x does not have; ``PreTrainedTokenizerFast`` is the
    same fast tokenizer under the name both know) with special tokens in the form 4.x reads, and the inputs a
    causal LM takes (``model(**tokenizer(text))`` and ``generate(**...)`` work in every version)."""
    portable = {k: v for k, v in tokenizer_config.items() if k not in ("auto_map", "backend", "is_local",
                                                                              "local_files_only")}
    if has_tokenizer_json and portable.get("tokenizer_class") in (None, "TokenizersBackend"):
        portable["tokenizer_class"] = "PreTrainedTokenizerFast"
    portable.setdefault("model_input_names", ["input_ids", "attention_mask"])  # 4.x adds token_type_ids otherwise
    extra = portable.get("extra_special_tokens")
    if isinstance(extra, list):  # 5.x: a list of tokens; 4.x: {name: token}, with the list as additional_special_tokens
        del portable["extra_special_tokens"]
        portable.setdefault("additional_special_tokens", extra)
    return portable
