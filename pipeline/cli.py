"""The ``layermoe`` command: one subcommand per stage, ``run`` for the whole pipeline, and helpers.

Exit statuses: 0 done; 2 a problem with the config, the inputs or the environment, named in one line; 75
stopped by SIGTERM/SIGUSR1 at a safe point (run the same command again to continue); 130 SIGINT
(``pipeline/stop_signals.py``)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sys
import time
import traceback
from pathlib import Path

from pipeline import log
from pipeline.allocate import allocate_from_similarity_file
from pipeline.atomic import cannot_write, read_json_object
from pipeline.baselines import DEFAULT_METHODS, METHODS, run_baselines
from pipeline.capacity import (DEFAULT_MFU, DEFAULT_PEAK_TFLOPS, Hardware, format_capacity, model_config_path,
                               parse_bytes, plan_config)
from pipeline.compare import compare_runs, to_markdown, write_comparison
from pipeline.config import AllocateConfig, default_cache_dir, load_config, to_dict, validate_allocate
from pipeline.default_model import ensure_default_model
from pipeline.distributed import distributed_from_env
from pipeline.errors import LayerMoEError
from pipeline.libreoffice_corpus import build_libreoffice_corpus
from pipeline.method_comparison import compare_methods, methods_markdown, plot_gain_vs_forgetting
from pipeline.plan import format_plan, load_model_config, plan
from pipeline.ranks import LOOPBACK
from pipeline.run_dir import claimed_run_dir
from pipeline.runner import run_pipeline, run_single_stage
from pipeline.stages import STAGES, StageOptions, get_stage
from pipeline.stop_signals import EXIT_INTERRUPTED, EXIT_STOPPED, StopRequested, stop_signals_raise

OVERRIDES_HELP = "dotted overrides applied after the YAML, e.g. analyze.batch_size=4 rounds.0.languages=[el,hu]"
RESUME_HELP = ("start the training stage this checkpoint (a .../train_stageN.checkpoints*/stepK directory) belongs to "
               "from it, even with other settings (e.g. a lower lr after a NaN stop): weights, step and RNG from the "
               "checkpoint, this run's learning-rate schedule, fresh optimizer moments")
# file-system errors outside this program's control: one line naming the file, exit status 2
NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
NO_ACCESS_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM}


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


def _options(args: argparse.Namespace) -> StageOptions:
    resume_from = getattr(args, "resume_from", None)
    return StageOptions(args.force, Path(resume_from) if resume_from else None)


def _stage(args: argparse.Namespace) -> None:
    if getattr(args, "similarity", None):
        _allocate_from_file(args)
        return
    config = _load(args)
    with distributed_from_env():
        run_single_stage(config, get_stage(args.stage_name), args.round, _options(args))


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
    with distributed_from_env() as dist, claimed_run_dir(config, args.start_over):
        # the log file after the claim: --start-over empties the run directory
        path = args.exit_stack.enter_context(log.tee_output(run_log_file(config, dist.rank)))
        log.info(f"layermoe run {config.name}: this output is also in {path}")
        run_pipeline(config, _options(args), first=first, last=last)


def _allocate_from_file(args: argparse.Namespace) -> None:
    """``layermoe allocate --similarity FILE ... --output DIR``: no config, no run directory."""
    if args.config_file or args.config_opt or args.overrides:
        raise LayerMoEError("allocate --similarity takes no config or KEY=VALUE overrides; use --delta/--budget/"
                            "--uniform/--explicit, --classifier-count, --aggregation")
    chosen = {k: v for k, v in (("reference", args.delta), ("budget", args.budget), ("uniform", args.uniform),
                                ("explicit", args.explicit)) if v is not None}
    if len(chosen) != 1:
        raise LayerMoEError("allocate --similarity needs exactly one of --delta D, --budget B, --uniform N, --explicit N...")
    if args.output is None:
        raise LayerMoEError("allocate --similarity needs --output DIR")
    method = next(iter(chosen))
    settings = AllocateConfig(method=method, delta=args.delta, budget=args.budget, experts_per_layer=args.uniform,
                              explicit=args.explicit, aggregation=args.aggregation, min_new_experts=args.min_new_experts,
                              classifier_count=args.classifier_count, classifier_layers=args.classifier_layers)
    validate_allocate(settings, "allocate")
    allocate_from_similarity_file(Path(args.similarity), settings, Path(args.output))


def _compare(args: argparse.Namespace) -> None:
    run_dirs = [Path(d) for d in args.run_dirs]
    if args.by_method:
        rows = compare_methods(run_dirs)
        print(methods_markdown(rows))
        if args.figure:
            plot_gain_vs_forgetting(rows, Path(args.figure))
        return
    sections = compare_runs(run_dirs)
    print(to_markdown(sections))
    if args.output:
        for path in write_comparison(sections, Path(args.output)):
            log.info(f"wrote {path}")


def _baselines(args: argparse.Namespace) -> None:
    path = args.config_opt or args.config_file
    if path is None:
        raise LayerMoEError("no config given: pass CONFIG (e.g. configs/default.yaml)")
    run_baselines(Path(path), list(args.overrides), args.seeds, args.methods, Path(args.output), args.keep_checkpoints)


def _show_config(args: argparse.Namespace) -> None:
    print(json.dumps(to_dict(_load(args)), indent=2))


def _plan(args: argparse.Namespace) -> None:
    if args.config_file or args.config_opt:
        _capacity(args)
        return
    if not args.model:
        raise LayerMoEError("plan needs a CONFIG (capacity plan) or --model DIR (parameter counts)")
    model_config = load_model_config(Path(args.model))
    layers = model_config["num_hidden_layers"]
    if args.allocation:
        path = Path(args.allocation)
        doc = read_json_object(path, "allocation file", required=("experts_per_layer",))
        experts, classifiers = doc["experts_per_layer"], doc.get("classifier_layers", [])
        if not (isinstance(experts, list) and experts and all(type(n) is int and n >= 1 for n in experts)
                and isinstance(classifiers, list) and all(type(i) is int for i in classifiers)):
            raise LayerMoEError(f"{path}: experts_per_layer must be a non-empty list of counts >= 1 and "
                                f"classifier_layers a list of layer indices")
    elif args.experts:
        experts, classifiers = [args.experts] * layers, []
    else:
        raise LayerMoEError("plan needs --allocation FILE or --experts N")
    print(format_plan(plan(model_config, experts, classifiers, args.top_k), args.dtype))


def _add_standalone_allocate_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("allocation from a similarity file (no config, no run directory)")
    g.add_argument("--similarity", metavar="FILE", help="a similarity.json (analyze's, or one built from published pairs)")
    g.add_argument("--delta", type=float, help="reference: N_i = ceil(delta * (1/S_i) / sum_j 1/S_j)")
    g.add_argument("--budget", type=int, help="exactly this many new experts in all")
    g.add_argument("--min-new-experts", type=int, default=1, help="with --budget: new experts every layer gets at least")
    g.add_argument("--uniform", type=int, metavar="N", help="N experts (incl. the original) in every layer")
    g.add_argument("--explicit", type=int, nargs="+", metavar="N", help="experts per layer (incl. the original)")
    g.add_argument("--classifier-count", type=int, default=7, help="classifiers in the K most similar MoE layers")
    g.add_argument("--classifier-layers", type=int, nargs="+", metavar="I", help="classifier layers, instead of --classifier-count")
    g.add_argument("--aggregation", default="nn_no_mean", choices=["nn_no_mean", "new_new", "new_old", "all_pairs"])
    g.add_argument("--output", metavar="DIR", help="where allocation.json and allocation.png go")


def _capacity(args: argparse.Namespace) -> None:
    config = _load(args)
    path = model_config_path(config, args.model)
    hardware = Hardware(args.gpus_per_node, args.nodes, parse_bytes(args.gpu_memory), args.gpu_tflops * 1e12, args.mfu,
                        "cpu" if args.cpu else "gpu")
    if min(hardware.gpus_per_node, hardware.nodes) < 1 or not 0 < hardware.mfu <= 1 or hardware.peak_flops <= 0:
        raise LayerMoEError("--gpus-per-node and --nodes must be >= 1, --mfu in (0, 1], --gpu-tflops positive")
    print(format_capacity(config, str(path), plan_config(config, load_model_config(path), hardware), hardware))


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
                   help="empty the run directory first (needed when it holds a different experiment); only a "
                        "directory this project made")
    p.add_argument("--resume-from", metavar="CHECKPOINT", help=RESUME_HELP)
    p.set_defaults(func=_run)

    for stage in STAGES:
        p = sub.add_parser(stage.name, help=stage.help)
        _add_config_args(p)
        p.add_argument("--round", help="only this round (by name); default: every round in order")
        p.add_argument("--force", action="store_true", help="re-run even when up to date")
        if stage.resumable:
            p.add_argument("--resume-from", metavar="CHECKPOINT", help=RESUME_HELP)
        p.set_defaults(func=_stage, stage_name=stage.name)
        if stage.name == "allocate":
            _add_standalone_allocate_args(p)

    p = sub.add_parser("train", help="one training stage: `deepspeed stages/train.py --config C --stage 1|2`")
    _add_config_args(p)
    p.add_argument("--stage", type=int, choices=[1, 2], required=True)
    p.add_argument("--round", help="only this round (by name); default: every round in order")
    p.add_argument("--force", action="store_true", help="re-run even when up to date")
    p.add_argument("--resume-from", metavar="CHECKPOINT", help=RESUME_HELP)
    p.set_defaults(func=_train)

    p = sub.add_parser("compare", help="put several runs side by side, round by round (same languages per table)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--by-method", action="store_true",
                   help="one row per method (runs named <method>-s<seed>): mean ± std over the seeds")
    p.add_argument("--figure", metavar="PNG", help="with --by-method: also plot new-language gain vs old-language change")
    p.add_argument("--output", metavar="DIR", help="also write compare.md, compare.csv and compare.png into DIR")
    p.set_defaults(func=_compare)

    p = sub.add_parser("baselines", help="LayerMoE vs dense, LoRA and MoE-LPR baselines on round 1, over seeds")
    _add_config_args(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, metavar="METHOD",
                   help=f"default: {', '.join(DEFAULT_METHODS)}; also: "
                        f"{', '.join(m for m in METHODS if m not in DEFAULT_METHODS)}")
    p.add_argument("--output", default="runs/baselines", help="directory of the runs and the comparison")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each finished run's training checkpoints")
    p.set_defaults(func=_baselines)

    p = sub.add_parser("plan", help="CONFIG: memory per GPU and time of every training stage; --model: parameters "
                                    "of an expansion (no weights loaded either way)")
    _add_config_args(p)
    p.add_argument("--model", help="model directory or its config.json (with CONFIG: instead of model.path)")
    p.add_argument("--allocation", help="allocation.json (without CONFIG)")
    p.add_argument("--experts", type=int, help="uniform: total experts per layer (without CONFIG, instead of --allocation)")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpu-memory", default="80GiB", help="memory of one GPU, e.g. 80GiB, 40GB")
    p.add_argument("--gpu-tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                   help=f"peak TFLOP/s of one GPU in the training precision (default {DEFAULT_PEAK_TFLOPS:g}: A100 "
                        f"bf16 dense; H100 SXM: 989)")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU, help=f"model FLOPs utilisation (default {DEFAULT_MFU})")
    p.add_argument("--cpu", action="store_true", help="predict the host memory of CPU processes instead (validation)")
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
    # args.exit_stack: what a command opens for its whole run (the run's log file)
    with log.heartbeat(), contextlib.ExitStack() as args.exit_stack:
        try:
            with stop_signals_raise():
                args.func(args)
        except LayerMoEError as e:
            log.error(str(e))
            return 2
        except OSError as e:
            if e.errno not in NO_SPACE_ERRNOS | NO_ACCESS_ERRNOS or e.filename is None:
                traceback.print_exc()  # a bug: its traceback also belongs in the run's log file
                return 1
            log.error(str(cannot_write(Path(e.filename), e)) if e.errno in NO_SPACE_ERRNOS
                      else f"cannot write {e.filename}: {e.strerror}")
            return 2
        except StopRequested as e:
            log.error(f"{e}; exit status {EXIT_STOPPED}: run the same command again to continue")
            return EXIT_STOPPED
        except KeyboardInterrupt:
            log.error("interrupted (SIGINT)")
            return EXIT_INTERRUPTED
        except Exception:  # a bug: its traceback also belongs in the run's log file
            traceback.print_exc()
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
