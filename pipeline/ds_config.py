"""DeepSpeed configs: reading one from ``ds_configs/`` (or any path) with our settings filled in, and its precision."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pipeline.atomic import read_json
from pipeline.config import StageTrainConfig

Precision = Literal["bf16", "fp16", "fp32"]
BUNDLED_DIR = Path(__file__).resolve().parents[1]  # ds_configs/ of this project lives here


def deepspeed_config(path: str, settings: StageTrainConfig, clipping: float) -> dict:
    """A DeepSpeed config from ``ds_configs/``, with the "auto" entries filled from our config.

    A relative ``path`` that does not exist from the working directory is looked up in this project, so the
    bundled configs work wherever a stage is started from."""
    file = Path(path)
    bundled = BUNDLED_DIR / path
    if not file.is_file() and not file.is_absolute() and bundled.is_file():
        file = bundled
    ds = read_json(file, "train.ds_config: DeepSpeed config")
    fill = {"train_micro_batch_size_per_gpu": settings.micro_batch_size,
            "gradient_accumulation_steps": settings.gradient_accumulation, "gradient_clipping": clipping}
    for key, value in fill.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    ds.pop("train_batch_size", None)
    return ds


def precision(ds: dict) -> Precision:
    """The floating-point format a DeepSpeed config trains in: ``bf16`` or ``fp16`` when enabled, else ``fp32``."""
    for name in ("bf16", "fp16"):
        if ds.get(name, {}).get("enabled"):
            return name
    return "fp32"
