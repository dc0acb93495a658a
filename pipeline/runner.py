"""The whole-run loop: the stages of the stage table (``pipeline/stages.py``), round after round.

A round after the first starts from the previous round's trained model, so the loop stops (without an error)
before a round whose input model does not exist yet. Finished stages are skipped by the stages themselves.
Every command holds the run directory (``pipeline.run_dir.claimed_run_dir``: its lock, its marker) while it runs.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

from pipeline import distributed, log
from pipeline.checkpoint_dir import checkpoint_stage, resumed_from_request
from pipeline.config import RunConfig
from pipeline.errors import LayerMoEError
from pipeline.eval_report import read_report
from pipeline.launch import run_stage_in_processes
from pipeline.report import short_table
from pipeline.run_dir import RoundNotReady, claimed_run_dir, round_input_model, stage_dir
from pipeline.stages import STAGE_NAMES, STAGES, Stage, StageOptions, get_stage


def ready_rounds(config: RunConfig) -> Iterator[int]:
    """Round indices in order, as long as each round's input model exists.

    A round after the first needs the previous round's trained model; when it is not there this logs why
    and stops (not an error: everything that could run has run).
    """
    for r, rnd in enumerate(config.rounds):
        try:
            round_input_model(config, r)
        except RoundNotReady as e:
            log.info(f"stopping before round {rnd.name!r}: {e}. The stages in this version are {list(STAGE_NAMES)}.")
            return
        yield r


def select_stages(first: str | None = None, last: str | None = None) -> tuple[Stage, ...]:
    """The stages from ``first`` to ``last`` (inclusive; None: from the first, to the last) in table order."""
    start = STAGES.index(get_stage(first)) if first is not None else 0
    end = STAGES.index(get_stage(last)) + 1 if last is not None else len(STAGES)
    return STAGES[start:end]


def resume_target(config: RunConfig, checkpoint: Path, stages: tuple[Stage, ...]) -> tuple[int, str]:
    """The (round index, stage name) that ``--resume-from checkpoint`` starts, among ``stages``: the stage the
    checkpoint belongs to, or, when it is no longer there (a rerun after it was moved aside), the stage whose
    checkpoints were started from it."""
    targets = [(r, stage.name) for r in range(len(config.rounds)) for stage in stages if stage.resumable]
    if checkpoint.exists():
        label = checkpoint_stage(checkpoint.resolve())
    else:
        started = [(r, name) for r, name in targets
                   if resumed_from_request(stage_dir(config, r, f"{name}.checkpoints")) == str(checkpoint.resolve())]
        if not started:
            raise LayerMoEError(f"--resume-from: checkpoint {checkpoint} does not exist")
        label = f"{config.rounds[started[0][0]].name}/{started[0][1]}"
    for r, name in targets:
        if label == f"{config.rounds[r].name}/{name}":
            return r, name
    raise LayerMoEError(f"--resume-from {checkpoint}: a checkpoint of {label or 'an unknown stage'}, which this command "
                        f"does not run (it runs {[f'{config.rounds[r].name}/{n}' for r, n in targets] or 'no training'}"
                        f"); name the stage with `layermoe train --stage N --round R --resume-from ...`")


def _options_for(options: StageOptions, target: tuple[int, str] | None, round_index: int, stage: Stage) -> StageOptions:
    """``options`` for one stage of one round: ``resume_from`` only for the stage it starts."""
    return options if target == (round_index, stage.name) else replace(options, resume_from=None)


def run_single_stage(config: RunConfig, stage: Stage, round_name: str | None = None,
                     options: StageOptions = StageOptions()) -> None:
    """One stage, for the round called ``round_name`` or for every ready round, in this process (and the others
    of the launcher that started it). With ``options.resume_from`` and no round, the checkpoint's round."""
    with claimed_run_dir(config):
        target = None
        if options.resume_from is not None:
            target = (config.round_index(round_name), stage.name) if round_name else \
                resume_target(config, options.resume_from, (stage,))
        rounds = [config.round_index(round_name)] if round_name else list(ready_rounds(config))
        for r in rounds:
            stage.run(config, r, _options_for(options, target, r, stage))
    if stage.name == "evaluate" and rounds:
        print_report(config, rounds[-1])


class RunProgress:
    """``stage k/N: <round>/<stage>`` headers with the time so far and the time left: each stage ahead is
    expected to take as long as it last took in this run (in an earlier round). Stages that have not run yet
    are named rather than guessed (training takes hours where the stages before it take minutes), and the sum
    is then a lower bound."""

    RAN = 1.0  # seconds: a stage that took less was (as good as) skipped

    def __init__(self, total: int):
        self.total, self.done, self.started = total, 0, time.monotonic()
        self.took: dict[str, float] = {}  # stage name -> seconds, the last time it ran

    def header(self, round_name: str, stage: str, remaining: list[str]) -> None:
        """Log the header of ``stage``; ``remaining``: the names of the stages after it."""
        self.done += 1
        elapsed = log.duration(time.monotonic() - self.started)
        ahead = [stage, *remaining]
        timed = sum(self.took[name] for name in ahead if name in self.took)
        untimed = ", ".join(dict.fromkeys(name for name in ahead if name not in self.took))
        if not untimed:
            left = f"about {log.duration(timed)} left"
        elif timed:
            left = f"at least {log.duration(timed)} left, not yet timed: {untimed}"
        else:
            left = f"time left not known yet, not yet timed: {untimed}"
        log.info(f"stage {self.done}/{self.total}: {round_name}/{stage} (elapsed {elapsed}, {left})")

    def finished(self, stage: str, seconds: float) -> None:
        if seconds >= self.RAN:
            self.took[stage] = seconds


def run_pipeline(config: RunConfig, options: StageOptions = StageOptions(), first: str | None = None,
                 last: str | None = None, start_over: bool = False) -> None:
    """Every stage of every ready round, in order; finished stages are skipped. ``first``/``last`` restrict
    the stages run in each round (``--from``, ``--until``; both = ``--only``). With
    ``launch.processes_per_node > 1`` the stages that split over ranks run under the DeepSpeed launcher."""
    selected = select_stages(first, last)
    plan = [(r, stage) for r in range(len(config.rounds)) for stage in selected]
    progress = RunProgress(len(plan))
    ran = []
    with claimed_run_dir(config, start_over):
        target = resume_target(config, options.resume_from, selected) if options.resume_from is not None else None
        processes = config.launch.processes_per_node
        for r in ready_rounds(config):
            ran.append(r)
            for stage in selected:
                position = plan.index((r, stage))
                progress.header(config.rounds[r].name, stage.name, [s.name for _, s in plan[position + 1:]])
                started = time.monotonic()
                stage_options = _options_for(options, target, r, stage)
                if stage.splits_over_ranks and processes > 1 and distributed.current().world_size == 1:
                    run_stage_in_processes(stage.name, stage.entry_argv, config.run_path / "config.json",
                                           config.rounds[r].name, [], processes, stage_options.force,
                                           stage_options.resume_from)
                else:
                    stage.run(config, r, stage_options)
                progress.finished(stage.name, time.monotonic() - started)
    if ran and any(stage.name == "evaluate" for stage in selected):
        print_report(config, ran[-1])
    log.info(f"run complete: {config.run_path}")


def print_report(config: RunConfig, round_index: int) -> None:
    """Print where round ``round_index``'s report is and its short table (on stdout, once), if it exists."""
    report_md = stage_dir(config, round_index, "evaluate") / "report.md"
    if report_md.exists() and distributed.current().is_main:
        report = read_report(report_md.with_name("report.json"))
        print(f"\nReport: {report_md}\n\n{short_table(report)}\n", flush=True)
