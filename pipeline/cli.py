"""The ``layermoe`` command: one subcommand per stage, ``run`` for the whole pipeline, and helpers."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

from pipeline import log
from pipeline.config import default_cache_dir, load_config, to_dict
from pipeline.default_model import ensure_default_model
from pipeline.distributed import distributed_from_env
from pipeline.errors import LayerMoEError
from pipeline.libreoffice_corpus import build_libreoffice_corpus
from pipeline.plan import format_plan, load_model_config, plan
from pipeline.ranks import LOOPBACK
from pipeline.compare import compare_runs, to_markdown, write_comparison
from pipeline.run_dir import claim_run_dir
from pipeline.runner import run_pipeline, run_single_stage
from pipeline.stages import STAGES, get_stage

OVERRIDES_HELP = "dotted overrides applied after the YAML, e.g. analyze.batch_size=4 rounds.0.languages=[el,hu]"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config_file", nargs="?", metavar="CONFIG", help="run config (YAML)")
    p.add_argument("--config", dest="config_opt", metavar="CONFIG", help="same as the positional CONFIG")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)


def _load(args: argparse.Namespace):
    path = args.config_opt or args.config_file
    overrides = list(args.overrides)
    if args.config_opt and args.config_file:  # the positional slot caught the first override
        overrides.insert(0, args.config_file)
    if path is None:
        raise LayerMoEError("no config given: pass CONFIG or --config CONFIG (e.g. configs/default.yaml)")
    return load_config(path, overrides)


def _stage(args: argparse.Namespace) -> None:
    config = _load(args)
    with distributed_from_env():
        run_single_stage(config, get_stage(args.stage_name), args.round, args.force)


def _train(args: argparse.Namespace) -> None:
    args.stage_name = f"train_stage{args.stage}"
    _stage(args)


def run_log_file(config, rank: int) -> Path:
    """``<run_dir>/logs/<UTC time>-run.log`` (``-rank<N>`` added on ranks other than 0 of a multi-process run)."""
    suffix = f"-rank{rank}" if rank else ""
    return config.run_path / "logs" / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-run{suffix}.log"


def _run(args: argparse.Namespace) -> None:
    config = _load(args)
    first, last = (args.only, args.only) if args.only else (args.first, args.until)
    with distributed_from_env() as dist:
        claim_run_dir(config, args.start_over)  # before the log file: --start-over deletes the run directory
        path = args.exit_stack.enter_context(log.tee_output(run_log_file(config, dist.rank)))
        log.info(f"layermoe run {config.name}: this output is also in {path}")
        run_pipeline(config, force=args.force, first=first, last=last)


def _compare(args: argparse.Namespace) -> None:
    sections = compare_runs([Path(d) for d in args.run_dirs])
    print(to_markdown(sections))
    if args.output:
        for path in write_comparison(sections, Path(args.output)):
            log.info(f"wrote {path}")


def _show_config(args: argparse.Namespace) -> None:
    print(json.dumps(to_dict(_load(args)), indent=2))


def _plan(args: argparse.Namespace) -> None:
    model_config = load_model_config(Path(args.model))
    layers = model_config["num_hidden_layers"]
    if args.allocation:
        path = Path(args.allocation)
        if not path.is_file():
            raise LayerMoEError(f"allocation file {str(path)!r} does not exist")
        try:
            doc = json.loads(path.read_text())
            experts, classifiers = doc["experts_per_layer"], doc.get("classifier_layers", [])
        except (json.JSONDecodeError, KeyError) as e:
            raise LayerMoEError(f"{path}: not a valid allocation.json ({e})") from None
    elif args.experts:
        experts, classifiers = [args.experts] * layers, []
    else:
        raise LayerMoEError("plan needs --allocation FILE or --experts N")
    print(format_plan(plan(model_config, experts, classifiers, args.top_k), args.dtype))


def _cache_dir(args: argparse.Namespace) -> Path:
    return Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()


def _build_corpus(args: argparse.Namespace) -> None:
    corpus = build_libreoffice_corpus(args.languages, _cache_dir(args))
    print(corpus.root)


def _prepare_model(args: argparse.Namespace) -> None:
    print(ensure_default_model(_cache_dir(args)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layermoe", description="Layer-wise MoE multilingual expansion of dense LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run every stage of every round (finished stages are skipped)")
    _add_config_args(p)
    p.add_argument("--force", action="store_true", help="re-run stages even when they are up to date")
    p.add_argument("--from", dest="first", metavar="STAGE", help="start each round at this stage")
    p.add_argument("--until", metavar="STAGE", help="end each round after this stage")
    p.add_argument("--only", metavar="STAGE", help="run only this stage in each round")
    p.add_argument("--start-over", action="store_true",
                   help="delete the run directory first (needed when it holds a different experiment)")
    p.set_defaults(func=_run)

    for stage in STAGES:
        p = sub.add_parser(stage.name, help=stage.help)
        _add_config_args(p)
        p.add_argument("--round", help="only this round (by name); default: every round in order")
        p.add_argument("--force", action="store_true", help="re-run even when up to date")
        p.set_defaults(func=_stage, stage_name=stage.name)

    p = sub.add_parser("train", help="one training stage: `deepspeed stages/train.py --config C --stage 1|2`")
    _add_config_args(p)
    p.add_argument("--stage", type=int, choices=[1, 2], required=True)
    p.add_argument("--round", help="only this round (by name); default: every round in order")
    p.add_argument("--force", action="store_true", help="re-run even when up to date")
    p.set_defaults(func=_train)

    p = sub.add_parser("compare", help="put several runs side by side, round by round (same languages per table)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--output", metavar="DIR", help="also write compare.md, compare.csv and compare.png into DIR")
    p.set_defaults(func=_compare)

    p = sub.add_parser("plan", help="total / activated parameters of an expansion, without loading weights")
    p.add_argument("--model", required=True, help="model directory or its config.json")
    p.add_argument("--allocation", help="allocation.json")
    p.add_argument("--experts", type=int, help="uniform: total experts per layer (instead of --allocation)")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=_plan)

    p = sub.add_parser("show-config", help="print the fully resolved config (dry run)")
    _add_config_args(p)
    p.set_defaults(func=_show_config)

    p = sub.add_parser("build-corpus", help="build the offline LibreOffice corpus into the cache")
    p.add_argument("--languages", nargs="+", default=["en", "es", "zh", "el", "hu", "tr", "hi", "bn", "ne"])
    p.add_argument("--cache-dir", help="default: $LAYERMOE_CACHE or ~/.cache/layermoe")
    p.set_defaults(func=_build_corpus)

    p = sub.add_parser("prepare-model", help="de-quantise the built-in SmolLM2-135M-Instruct (its Q4_1 GGUF) into an HF "
                                             "directory in the cache")
    p.add_argument("--cache-dir", help="default: $LAYERMOE_CACHE or ~/.cache/layermoe")
    p.set_defaults(func=_prepare_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MASTER_ADDR", LOOPBACK)  # local multi-process runs stay on loopback
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may also come after options (argparse stops collecting positionals at an option)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    log.quiet_libraries()
    log.start_heartbeat()
    with contextlib.ExitStack() as args.exit_stack:  # what a command opens for its whole run (the run's log file)
        try:
            args.func(args)
        except LayerMoEError as e:
            log.error(str(e))
            return 2
        except KeyboardInterrupt:
            log.error("interrupted")
            return 130
        except Exception:  # a bug: its traceback also belongs in the run's log file
            traceback.print_exc()
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
