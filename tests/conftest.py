"""Shared fixtures: a synthetic multilingual corpus, a SentencePiece tokenizer trained on it, tiny random models.

Nothing here touches a network: the tokenizer is trained locally and models are built from configs.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("PYTHONFAULTHANDLER", "1")  # a child stopped by run_child prints its stacks

from pipeline.accelerator import choose_deepspeed_accelerator  # noqa: E402

from preimported_cli import Server  # noqa: E402

choose_deepspeed_accelerator()  # for the DeepSpeed launchers the tests start themselves

# The longest test files (minutes each: real Slurm jobs, multi-process training, fault runs) are handed to the two
# xdist workers first (``--dist loadfile`` takes files in collection order), so that no long file starts last and
# runs alone at the end.
LONG_FILES_FIRST = ("test_slurm.py", "test_train.py", "test_faults.py", "test_gpu_check.py", "test_launchers.py",
                    "test_capacity_validation.py", "test_atomic.py")


ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_env() -> dict[str, str]:
    """This process's environment for a child: without the launcher variables other tests may have left behind,
    on loopback, one thread per process."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    return {**env, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}


_preimported: list[Server] = []  # this worker's server, the one for the environment of the last command


def preimported_server(env: dict[str, str]) -> Server:
    """This worker's server of preimported ``python -m pipeline.cli`` processes for ``env`` (tests/preimported_cli.py);
    a command in another environment (a test may leave a variable set) replaces it with a server for that one."""
    if _preimported and not _preimported[0].serves(env):
        _preimported.pop().stop()
    if not _preimported:
        _preimported.append(Server(env))
    return _preimported[0]


@atexit.register
def _stop_preimported_server() -> None:
    while _preimported:
        _preimported.pop().stop()


def run_child(args: list[str], *, timeout: float, preimported: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)``, except that a child
    still running after ``timeout`` seconds fails the test with where it hung: it and every process it started get
    SIGABRT, on which the Python ones print every thread's stack (PYTHONFAULTHANDLER, set above; no core files),
    and the failure shows the end of their output. ``preimported``: a ``python -m pipeline.cli`` command runs as a
    fork of a process that has done its imports in the same environment (tests/preimported_cli.py), ~6 s sooner."""
    if preimported and Server.can_run(args, kwargs):
        process = preimported_server(kwargs.get("env", dict(os.environ))).start(args, **kwargs)
    else:
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0)), **kwargs)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree = [process.pid, *(child.pid for child in psutil.Process(process.pid).children(recursive=True))]

        def send(signum: int) -> None:
            for pid in tree:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)

        send(signal.SIGABRT)
        try:
            stdout, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            send(signal.SIGKILL)
            stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(map(str, args))} still ran after {timeout:.0f} s; the stacks of its {len(tree)} "
                    f"processes on SIGABRT, and the end of its output:\n{stdout[-2000:]}\n{stderr[-10000:]}",
                    pytrace=False)
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def run_cli(args: list[str], *, timeout: float = 600, preimported: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """``layermoe ARGS`` (``python -m pipeline.cli``) from the repository root in a child process: ``run_child``,
    forked from a preimported process unless ``preimported`` is False."""
    return run_child([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=clean_env(), timeout=timeout,
                     preimported=preimported, **kwargs)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    first = {name: i for i, name in enumerate(LONG_FILES_FIRST)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: order within a file unchanged


ALPHABETS = {
    "en": "abcdefghijklmnopqrstuvwxyz",
    "el": "αβγδεζηθικλμνξοπρστυφχψω",
    "hu": "aábcdeéfghiíjklmnoóöőprstuúüűvz",
    "tr": "abcçdefgğhıijklmnoöprsştuüvyz",
}


def synthetic_documents(lang: str, n: int, seed: int = 0) -> list[str]:
    """Deterministic pseudo-text in ``lang``'s alphabet: ``n`` documents of 1-3 sentences."""
    rng = random.Random(f"{lang}-{seed}")
    alphabet = ALPHABETS[lang]
    docs = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(1, 3)):
            words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(2, 7))) for _ in range(rng.randint(4, 14))]
            sentences.append(" ".join(words).capitalize() + ".")
        docs.append(" ".join(sentences))
    return docs


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    return path


def train_stores(root: Path, tokenizer_dir: Path, documents: dict[str, list[str]]) -> dict:
    """Token stores (every document in the train split) of each language's ``documents``, by language, made under
    ``root`` with the tokenizer in ``tokenizer_dir``."""
    from pipeline.corpus import LanguageSource
    from pipeline.tokenize_corpus import StoreRequest, TokenizerSpec, build_stores

    requests = [StoreRequest(LanguageSource(lang, write_jsonl(root / f"{lang}.jsonl", texts), "jsonl"), ("train",), 0.0, 0)
                for lang, texts in documents.items()]
    stores = build_stores(requests, TokenizerSpec(tokenizer_dir), root / "tokens", workers=1)
    return {lang: stores[(lang, "train")] for lang in documents}


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """One jsonl file per language (en, el, hu, tr), 200 documents each."""
    root = tmp_path_factory.mktemp("corpus")
    for lang in ALPHABETS:
        write_jsonl(root / f"{lang}.jsonl", synthetic_documents(lang, 200))
    return root


def train_spm_model(root: Path) -> Path:
    """A 400-piece BPE SentencePiece model trained on the synthetic corpus (<unk>=0, <s>=1, </s>=2, <pad>=3)."""
    import sentencepiece

    root.mkdir(parents=True, exist_ok=True)
    text = root / "train.txt"
    text.write_text("\n".join(t for lang in ALPHABETS for t in synthetic_documents(lang, 200)))
    sentencepiece.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(root / "tokenizer"), vocab_size=400, model_type="bpe",
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2)
    return root / "tokenizer.model"


def write_tokenizer_dir(root: Path, spm_model: Path) -> Path:
    """An HF tokenizer directory (fast backend) converted from the SentencePiece model ``spm_model``."""
    from pipeline.packing import load_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.model").write_bytes(spm_model.read_bytes())
    load_tokenizer(root).save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory, corpus_dir) -> Path:
    return train_spm_model(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, spm_model) -> Path:
    return write_tokenizer_dir(tmp_path_factory.mktemp("tok"), spm_model)


def tiny_config(model_type: str, vocab_size: int = 512, layers: int = 3):
    """A tiny random-model config of a supported architecture (vocab leaves room for tokens a tokenizer class adds)."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=3)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "gemma3_text": Gemma3TextConfig}[model_type]
    if model_type == "gemma3_text":
        common.update(head_dim=8, sliding_window=16, layer_types=None)
    return cls(**common)


def tiny_model(model_type: str, seed: int = 0, layers: int = 3, **config):
    """A tiny random model (fp32, in memory); ``config`` sets further config fields (e.g. attention_dropout)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    settings = tiny_config(model_type, layers=layers)
    for key, value in config.items():
        setattr(settings, key, value)
    return AutoModelForCausalLM.from_config(settings)


def make_tiny_model(root: Path, model_type: str, tokenizer_dir: Path | None = None, seed: int = 0,
                    layers: int = 3, **config) -> Path:
    """Save a tiny random model (``tiny_model``) and the test tokenizer as an HF directory; returns it."""
    model = tiny_model(model_type, seed, layers, **config)
    root.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(root)
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            (root / f.name).write_bytes(f.read_bytes())
    return root


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer_dir) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("llama"), "llama", tokenizer_dir)


@pytest.fixture(scope="session")
def train_setup(tmp_path_factory, tokenizer_dir) -> Path:
    """Training runs: 2-layer tiny Llamas ``dense`` and ``dense_dropout`` (attention dropout 0.3: randomness in every
    training step) and 300 documents each of en, el, hu."""
    root = tmp_path_factory.mktemp("train")
    make_tiny_model(root / "dense", "llama", tokenizer_dir, seed=2, layers=2)
    make_tiny_model(root / "dense_dropout", "llama", tokenizer_dir, seed=2, layers=2, attention_dropout=0.3)
    for lang in ("en", "el", "hu"):
        write_jsonl(root / f"{lang}.jsonl", synthetic_documents(lang, 300, seed=11))
    return root
