"""Stage bookkeeping: every stage writes its artifacts and a manifest.json into its own directory, atomically.

The manifest records the config slice the stage used (its result settings: ``pipeline.config.result_settings``),
the hashes of its inputs and of every output it wrote, package versions and wall time. A stage is done, and
skipped, when its manifest fingerprint (config slice + input hashes + code version) matches and every output
is there with its recorded hash; otherwise it re-runs, and the log says why (the changed settings with old and
new values, a changed input, a missing or edited output). A change to an input, including an upstream
artifact, re-runs the stage and, through its changed outputs, everything downstream.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import json
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from pipeline import __version__, distributed, log
from pipeline.atomic import atomic_directory, read_json_object, write_json
from pipeline.errors import LayerMoEError

MANIFEST = "manifest.json"
_CHECKING_ONLY = contextvars.ContextVar("checking_only", default=False)
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

    @functools.cached_property
    def input_hashes(self) -> dict[str, str]:
        """The content hash of every input (computed once); a missing input is an error naming it."""
        missing = {name: str(p) for name, p in self.inputs.items() if not Path(p).exists()}
        if missing:
            raise LayerMoEError(f"{self.label}: inputs missing: {missing}; run the earlier stages first")
        return {name: self.hashed.get(name) or hash_path(p) for name, p in self.inputs.items()}

    @property
    def fingerprint(self) -> str:
        """What decides the stage's result: its config slice, its inputs' content and this code's version."""
        return fingerprint(self.config_slice, self.input_hashes)


def fingerprint(config_slice: dict[str, Any], input_hashes: dict[str, str]) -> str:
    """What decides whether a stage must re-run: its settings, its inputs, and the version of this code."""
    blob = json.dumps({"config": config_slice, "inputs": input_hashes, "layermoe": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def describe_changes(old_config: Any, old_inputs: dict[str, str], config_slice: dict[str, Any],
                     input_hashes: dict[str, str]) -> str:
    """What differs between a recorded (config slice, input hashes) and the current one, in a few words: the
    changed settings with their old and new values, then the changed inputs."""
    old, new = _flat(old_config), _flat(json.loads(json.dumps(config_slice, default=str)))
    short = lambda v: (text if len(text := json.dumps(v, default=str)) <= 60 else text[:57] + "...")
    changes = [f"{key}: {short(old.get(key))} -> {short(new.get(key))}" for key in sorted(set(old) | set(new))
               if old.get(key) != new.get(key)]
    changes += [f"input {name} changed" for name in sorted(set(old_inputs) | set(input_hashes))
                if old_inputs.get(name) != input_hashes.get(name)]
    if not changes:
        return "the version of this code changed"
    return "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")


def read_manifest(out_dir: Path) -> dict | None:
    """A stage directory's manifest, or None when there is none; an unreadable one is an error naming it."""
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        return None
    hint = f"; delete {out_dir} to run the stage again"
    manifest = read_json_object(path, "stage manifest", ("stage", "fingerprint", "config", "inputs"), hint)
    if not isinstance(manifest["fingerprint"], str) or not isinstance(manifest["inputs"], dict):
        raise LayerMoEError(f"stage manifest {path} is not a manifest of this project (fingerprint or inputs of the "
                            f"wrong type){hint}")
    return manifest


def stage_outputs(out_dir: Path) -> dict[str, str]:
    """Every file a stage wrote into ``out_dir`` (hidden files and the manifest aside), by relative path, with
    its hash."""
    return {p.relative_to(out_dir).as_posix(): hash_file(p) for p in sorted(Path(out_dir).rglob("*"))
            if p.is_file() and p.name != MANIFEST and not any(s.startswith(".") for s in p.relative_to(out_dir).parts)}


def why_not_done(spec: StageSpec) -> str | None:
    """None when the stage is done: its manifest has this fingerprint and every output it lists exists with the
    recorded hash. Otherwise why not, in a few words ("" when it never ran)."""
    previous = read_manifest(spec.out_dir)
    if previous is None:
        return ""
    if previous["fingerprint"] != spec.fingerprint:
        old_inputs = {name: entry.get("sha256") if isinstance(entry, dict) else None
                      for name, entry in previous["inputs"].items()}
        changes = describe_changes(previous["config"], old_inputs, spec.config_slice, spec.input_hashes)
        return f"inputs or settings changed since the last run ({changes})"
    outputs = previous.get("outputs")
    if not isinstance(outputs, dict) or not outputs:
        return "its manifest lists no outputs (written by an older version)"
    for name, digest in outputs.items():
        path = spec.out_dir / name
        if not path.is_file():
            return f"output {name} is missing"
        if hash_file(path) != digest:
            return f"output {name} is not what the stage wrote (changed since {previous.get('finished_at')})"
    return None


class StageNotDone(Exception):
    """Inside :func:`checking_only`: this stage would run."""


@contextlib.contextmanager
def checking_only() -> Iterator[None]:
    """Inside, :func:`run_stage` runs nothing and writes nothing: it returns the directory of a stage that is
    done and raises :class:`StageNotDone` for one that would run (how ``pipeline.stages.finished_stages`` asks
    the stages themselves whether they are done)."""
    token = _CHECKING_ONLY.set(True)
    try:
        yield
    finally:
        _CHECKING_ONLY.reset(token)


def run_stage(spec: StageSpec, body: Callable[[Path | None], dict[str, Any] | None], force: bool = False) -> Path:
    """Run ``body`` unless the stage is done (:func:`why_not_done`); return the stage directory.

    On the main rank ``body`` gets a fresh temporary directory that replaces ``spec.out_dir`` only after the
    body and the manifest are complete; on other ranks it gets ``None`` (compute, do not write). Whatever
    dict ``body`` returns is stored in the manifest under ``summary``; the manifest lists every file the body
    wrote, with its hash.
    """
    if _CHECKING_ONLY.get():
        if force or why_not_done(spec) is not None:
            raise StageNotDone(spec.label)
        return spec.out_dir
    fp = spec.fingerprint
    if not force:
        reason = why_not_done(spec)
        if reason is None:
            log.info(f"{spec.label}: up to date (finished {read_manifest(spec.out_dir).get('finished_at')}), skipping")
            return spec.out_dir
        if reason:
            log.info(f"{spec.label}: {reason}, re-running")
    log.info(f"{spec.label}: starting -> {spec.out_dir}")
    started = time.time()
    if not distributed.current().is_main:
        body(None)
        distributed.barrier()
        return spec.out_dir
    input_hashes = spec.input_hashes
    with atomic_directory(spec.out_dir) as tmp:
        summary = body(tmp)
        write_json(tmp / MANIFEST, {
            "stage": spec.stage,
            "round": spec.round_name,
            "fingerprint": fp,
            "config": spec.config_slice,
            "inputs": {name: {"path": str(p), "sha256": input_hashes[name]} for name, p in spec.inputs.items()},
            "outputs": stage_outputs(tmp),
            "versions": package_versions(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "wall_time_s": round(time.time() - started, 3),
            "summary": summary or {},
        })
    distributed.barrier()
    log.info(f"{spec.label}: done in {time.time() - started:.1f}s")
    return spec.out_dir
