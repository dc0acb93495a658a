"""Helpers of ``scripts/gpu_check.sh``: build its self-contained run (``prepare``) and read one step's key number
(``key``). Nothing here touches a network: the corpus is the test suite's synthetic text, the tokenizer is trained
on it, and the dense model is a random Llama of the given size.

    python scripts/gpu_check.py prepare DIR --device cuda --ranks 8 --hidden 512 --layers 8 --ds-config ds_configs/zero2_bf16.json
    python scripts/gpu_check.py key DIR train_stage1|evaluate
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import synthetic_documents, train_spm_model, write_jsonl, write_tokenizer_dir  # noqa: E402

LANGUAGES = {"old": ["en"], "new": ["el", "hu"]}


def prepare(directory: Path, device: str, ranks: int, hidden: int, layers: int, ds_config: str) -> Path:
    """Corpora, tokenizer, a random dense Llama and a one-round run config (``DIR/config.json``) whose stage 1
    trains ``ranks`` new experts per layer with ``train.ep_size = ranks``; returns the config's path."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    for lang in LANGUAGES["old"] + LANGUAGES["new"]:
        write_jsonl(directory / "corpus" / f"{lang}.jsonl", synthetic_documents(lang, 400, seed=1))
    tokenizer = write_tokenizer_dir(directory / "tokenizer", train_spm_model(directory / "spm"))
    heads = max(hidden // 64, 2)
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=512, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=1024, bos_token_id=1,
        eos_token_id=2, pad_token_id=3))
    dense.save_pretrained(directory / "dense")
    for f in tokenizer.iterdir():
        (directory / "dense" / f.name).write_bytes(f.read_bytes())
    dtype = "bfloat16" if "bf16" in ds_config else "float32"
    stage = {"warmup_steps": 1, "micro_batch_size": 4, "block_length": 256 if device == "cuda" else 64,
             "tokens_per_language": 20000}
    body = {"name": "gpu_check", "run_dir": str(directory / "run"), "old_languages": LANGUAGES["old"],
            "rounds": [{"name": "g1", "languages": LANGUAGES["new"]}],
            "model": {"path": str(directory / "dense"), "device": device, "dtype": dtype},
            "data": {"builtin_corpus": "none",
                     "sources": {lang: {"path": str(directory / "corpus" / f"{lang}.jsonl")}
                                 for lang in LANGUAGES["old"] + LANGUAGES["new"]}},
            "analyze": {"tokens_per_language": 2000, "batch_size": 4, "max_length": 128},
            "allocate": {"method": "uniform", "experts_per_layer": ranks + 1, "classifier_count": 1},
            "train": {"ds_config": ds_config, "ep_size": ranks, "stats_every": 1,
                      "stage1": {**stage, "steps": 5 if device == "cuda" else 2},
                      "stage2": {**stage, "steps": 2, "replay_tokens_per_language": 5000}},
            "evaluate": {"tokens_per_language": 4096, "block_length": 128, "translation_sentences": 0,
                         "include_stage1_models": False}}
    config = directory / "config.json"
    config.write_text(json.dumps(body, indent=1))
    return config


def key_number(directory: Path, stage: str) -> str:
    """The number the summary table shows for a finished stage of the run in ``directory``."""
    summary = json.loads((directory / "run" / "g1" / stage / "manifest.json").read_text())["summary"]
    if stage.startswith("train"):
        return (f"loss {summary['final_loss']['total']:.3f}, {summary['tokens_per_second']:,.0f} tok/s, "
                f"peak {summary['peak_memory_gib']:.2f} GiB")
    averages = summary["group_average"]
    return ", ".join(f"{label} ppl old {a['old']:.1f} new {a['new']:.1f}" for label, a in averages.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("directory", type=Path)
    p.add_argument("--device", choices=["cuda", "cpu"], required=True)
    p.add_argument("--ranks", type=int, required=True)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--ds-config", required=True)
    p = sub.add_parser("key")
    p.add_argument("directory", type=Path)
    p.add_argument("stage")
    args = parser.parse_args()
    if args.command == "prepare":
        print(prepare(args.directory, args.device, args.ranks, args.hidden, args.layers, args.ds_config))
    else:
        print(key_number(args.directory, args.stage))


if __name__ == "__main__":
    main()
