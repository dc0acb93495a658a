"""Stage bookkeeping: every stage writes its artifacts and a manifest.json into its own directory, atomically.

The manifest records the config slice the stage used, the hashes of its inputs, package versions and wall
time. A stage whose manifest fingerprint (config slice + input hashes) matches is skipped; any change to
an input, including an upstream artifact, re-runs it and, through its changed outputs, everything downstream.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from pipeline import __version__, distributed, log
from pipeline.atomic import atomic_directory, write_json
from pipeline.errors import LayerMoEError

MANIFEST = "manifest.json"
SAMPLED_HASH_ABOVE = 256 * 2**20  # files larger than this are identified by size, mtime and sampled content
_SAMPLE = 4 * 2**20


def hash_file(path: Path) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as f:
        if size <= SAMPLED_HASH_ABOVE:
            for block in iter(lambda: f.read(2**20), b""):
                h.update(block)
        else:
            h.update(f"size={size};mtime={path.stat().st_mtime_ns}".encode())
            h.update(f.read(_SAMPLE))
            f.seek(size // 2)
            h.update(f.read(_SAMPLE))
            f.seek(size - _SAMPLE)
            h.update(f.read(_SAMPLE))
    return h.hexdigest()


def hash_path(path: Path) -> str:
    """sha256 of a file, or of a directory's relative file names and file hashes (hidden files ignored)."""
    path = Path(path)
    if path.is_file():
        return hash_file(path)
    if not path.is_dir():
        raise FileNotFoundError(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file() and not any(s.startswith(".") for s in q.relative_to(path).parts)):
        h.update(f"{p.relative_to(path).as_posix()}\0{hash_file(p)}\n".encode())
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("layermoe", "torch", "transformers", "datasets", "deepspeed", "sentencepiece", "tokenizers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@dataclass
class StageSpec:
    """What a stage is, what it depends on, and where it writes."""

    stage: str
    round_name: str
    out_dir: Path
    config_slice: dict[str, Any]
    inputs: dict[str, Path] = field(default_factory=dict)
    hashed: dict[str, str] = field(default_factory=dict)  # hash_path of inputs the stage has hashed already, by name

    @property
    def label(self) -> str:
        return f"{self.round_name}/{self.stage}"


def fingerprint(config_slice: dict[str, Any], input_hashes: dict[str, str]) -> str:
    """What decides whether a stage must re-run: its settings, its inputs, and the version of this code."""
    blob = json.dumps({"config": config_slice, "inputs": input_hashes, "layermoe": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def read_manifest(out_dir: Path) -> dict | None:
    try:
        return json.loads((Path(out_dir) / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def run_stage(spec: StageSpec, body: Callable[[Path | None], dict[str, Any] | None], force: bool = False) -> Path:
    """Run ``body`` unless the stage is up to date; return the stage directory.

    On the main rank ``body`` gets a fresh temporary directory that replaces ``spec.out_dir`` only after the
    body and the manifest are complete; on other ranks it gets ``None`` (compute, do not write). Whatever
    dict ``body`` returns is stored in the manifest under ``summary``.
    """
    missing = {name: str(p) for name, p in spec.inputs.items() if not Path(p).exists()}
    if missing:
        raise LayerMoEError(f"{spec.label}: inputs missing: {missing}; run the earlier stages first")
    input_hashes = {name: spec.hashed.get(name) or hash_path(p) for name, p in spec.inputs.items()}
    fp = fingerprint(spec.config_slice, input_hashes)
    previous = read_manifest(spec.out_dir)
    if not force and previous is not None and previous.get("fingerprint") == fp:
        log.info(f"{spec.label}: up to date (finished {previous.get('finished_at')}), skipping")
        return spec.out_dir
    if previous is not None and not force:
        log.info(f"{spec.label}: inputs or settings changed since the last run, re-running")
    log.info(f"{spec.label}: starting -> {spec.out_dir}")
    started = time.time()
    if not distributed.current().is_main:
        body(None)
        distributed.barrier()
        return spec.out_dir
    with atomic_directory(spec.out_dir) as tmp:
        summary = body(tmp)
        write_json(tmp / MANIFEST, {
            "stage": spec.stage,
            "round": spec.round_name,
            "fingerprint": fp,
            "config": spec.config_slice,
            "inputs": {name: {"path": str(p), "sha256": input_hashes[name]} for name, p in spec.inputs.items()},
            "versions": package_versions(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "wall_time_s": round(time.time() - started, 3),
            "summary": summary or {},
        })
    distributed.barrier()
    log.info(f"{spec.label}: done in {time.time() - started:.1f}s")
    return spec.out_dir
