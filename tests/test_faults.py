"""Faults and bad input, one test per case (issue 13): checkpoints bound to their inputs, stage outputs checked,
the run marker and lock, stop signals, NaN stops, and one clear line (exit status 2) for every bad input.

Training runs in subprocesses (DeepSpeed keeps process-wide state between runs); the rest in this process.
Most training tests start from a copy of one finished tiny run (``finished_run``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.cli import main
from pipeline.evaluate import LanguageScore, ResultCache
from pipeline.ranks import free_port
from pipeline.run_dir import MARKER
from pipeline.stop_signals import EXIT_INTERRUPTED, EXIT_STOPPED
from test_pipeline import run_config  # noqa: F401  (a fixture: analyze -> allocate on a tiny model)
from conftest import clean_env, run_cli, run_child
from test_train import state, write_config

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(stage1=dict(steps=4, warmup_steps=1, micro_batch_size=2, block_length=32, tokens_per_language=1500),
            stage2=dict(steps=2, warmup_steps=1, micro_batch_size=2, block_length=32, tokens_per_language=1000,
                        replay_tokens_per_language=500),
            checkpoint_every=2)


@pytest.fixture(autouse=True)
def no_launcher_variables(monkeypatch):
    """Stages run in this process set RANK, WORLD_SIZE, ...: undo that after each test."""
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "LAYERMOE_RUN_LOCK"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def finished_run(train_setup, tmp_path_factory) -> Path:
    """A run directory whose round g1 is trained (stage 1: 4 steps with checkpoints at 2 and 4; stage 2: 2 steps)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    proc = run_cli(["run", str(write_config(train_setup, run_dir, **TINY)), "--until", "train_stage2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def copy_run(finished: Path, train_setup: Path, tmp_path: Path, **train) -> tuple[Path, Path]:
    """A copy of the finished run in ``tmp_path`` and its config (the finished run's settings updated by ``train``)."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    settings = {**TINY, **train, "stage1": {**TINY["stage1"], **train.get("stage1", {})},
                "stage2": {**TINY["stage2"], **train.get("stage2", {})}}
    return run_dir, write_config(train_setup, run_dir, **settings)


def stale_dirs(run_dir: Path, stage: str) -> list[Path]:
    return sorted((run_dir / "g1").glob(f"{stage}.checkpoints.stale-*"))


def exported_steps(run_dir: Path, stage: str) -> int:
    """The steps of the model a training stage exported (its manifest's summary)."""
    return json.loads((run_dir / "g1" / stage / "manifest.json").read_text())["summary"]["steps"]


def one_error_line(stderr: str) -> str:
    """The single ERROR line of a failed command (and no traceback)."""
    errors = [line for line in stderr.splitlines() if "ERROR:" in line]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


# ---------------------------------------------------------------------------------------------------------
# Checkpoints belong to what produced them
# ---------------------------------------------------------------------------------------------------------

def test_changed_corpus_restarts_training_instead_of_resuming_the_stale_checkpoint(train_setup, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "dense").symlink_to(train_setup / "dense")
    for lang in ("en", "el", "hu"):
        shutil.copyfile(train_setup / f"{lang}.jsonl", data / f"{lang}.jsonl")
    config = write_config(data, tmp_path / "run", **TINY)
    assert run_cli(["run", str(config), "--until", "train_stage1"]).returncode == 0
    g1 = tmp_path / "run" / "g1"
    before = state(g1 / "train_stage1" / "model")
    lines = (data / "el.jsonl").read_text().splitlines()
    (data / "el.jsonl").write_text("\n".join(lines[::-1]) + "\n")  # the same texts in another order: other batches
    proc = run_cli(["run", str(config), "--until", "train_stage1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not resuming these checkpoints (the stage's settings or inputs changed: input stores changed)" in proc.stderr
    assert "steps 0..4" in proc.stderr  # trained from the start, not "resumed at step 4 of 4"
    [stale] = stale_dirs(tmp_path / "run", "train_stage1")
    assert sorted(p.name for p in stale.glob("step*")) == ["step2", "step4"]  # kept, not deleted
    after = state(g1 / "train_stage1" / "model")
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.fixture(scope="module")
def reallocated_run(finished_run, train_setup, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The finished run, run again with another allocation ([3, 2] -> [2, 3]) up to stage 1 (tests that change it
    copy it first)."""
    run_dir, config = copy_run(finished_run, train_setup, tmp_path_factory.mktemp("reallocated"))
    proc = run_cli(["run", str(config), "--until", "train_stage1", "allocate.explicit=[2, 3]"])
    return run_dir, proc


def test_changed_allocation_restarts_training_instead_of_crashing_on_the_old_checkpoint(reallocated_run):
    run_dir, proc = reallocated_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "input model changed" in proc.stderr and "steps 0..4" in proc.stderr
    assert len(stale_dirs(run_dir, "train_stage1")) == 1
    model = json.loads((run_dir / "g1" / "train_stage1" / "model" / "config.json").read_text())
    assert model["experts_per_layer"] == [2, 3]


def test_resume_from_a_checkpoint_of_another_allocation_is_refused(reallocated_run, train_setup, tmp_path):
    assert reallocated_run[1].returncode == 0, reallocated_run[1].stderr[-3000:]
    run_dir, config = copy_run(reallocated_run[0], train_setup, tmp_path)
    [stale] = stale_dirs(run_dir, "train_stage1")
    proc = run_cli(["train", str(config), "--stage", "1", "--force", "allocate.explicit=[2, 3]",
                    "--resume-from", str(stale / "step4")])
    assert proc.returncode == 2
    assert "is of another model architecture or allocation than this stage's input model" in one_error_line(proc.stderr)
    assert len(stale_dirs(run_dir, "train_stage1")) == 2  # the current checkpoints were moved aside, not deleted
    assert (stale / "step4" / "layout.json").is_file()


def test_changed_stage1_lr_retrains_stage2_from_the_new_stage1_model(finished_run, train_setup, tmp_path):
    run_dir, config = copy_run(finished_run, train_setup, tmp_path)
    proc = run_cli(["run", str(config), "--until", "train_stage2", "train.stage1.lr=0.001"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage.lr: 0.003 -> 0.001" in proc.stderr
    assert len(stale_dirs(run_dir, "train_stage1")) == 1 and len(stale_dirs(run_dir, "train_stage2")) == 1
    stage1, stage2 = state(run_dir / "g1" / "train_stage1" / "model"), state(run_dir / "g1" / "train_stage2" / "model")
    experts = [k for k in stage1 if ".experts." in k]
    assert experts and all(torch.equal(stage1[k], stage2[k]) for k in experts)  # stage 2 starts from the new stage 1
    old = state(finished_run / "g1" / "train_stage1" / "model")
    assert any(not torch.equal(old[k], stage1[k]) for k in experts)


def test_changing_stats_every_or_checkpoint_every_reruns_nothing_and_keeps_the_checkpoints(finished_run, train_setup,
                                                                                            tmp_path):
    run_dir, config = copy_run(finished_run, train_setup, tmp_path)
    proc = run_cli(["run", str(config), "--until", "train_stage2", "train.stats_every=1", "train.checkpoint_every=1",
                    "train.tracking.wandb_project=other", "train.loss_chunk_tokens=0",
                    "train.activation_checkpointing=true", "train.ep_size=1"])
    assert proc.returncode == 0 and proc.stderr.count("up to date") == 6, proc.stderr[-3000:]
    # interrupted after step 2, resumed with another checkpoint cadence: continues at step 2, same weights
    shutil.rmtree(run_dir / "g1" / "train_stage1")
    shutil.rmtree(run_dir / "g1" / "train_stage1.checkpoints" / "step4")
    proc = run_cli(["train", str(config), "--stage", "1", "train.checkpoint_every=1", "train.stats_every=3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "at step 2" in proc.stderr and not stale_dirs(run_dir, "train_stage1")
    reference, resumed = state(finished_run / "g1" / "train_stage1" / "model"), state(run_dir / "g1" / "train_stage1" / "model")
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


def test_resume_uses_the_newest_complete_checkpoint_when_the_latest_is_incomplete(finished_run, train_setup, tmp_path):
    run_dir, config = copy_run(finished_run, train_setup, tmp_path)
    checkpoints = run_dir / "g1" / "train_stage1.checkpoints"
    shutil.rmtree(run_dir / "g1" / "train_stage1")
    (checkpoints / "step4" / "layout.json").unlink()  # killed while saving step 4; DeepSpeed's `latest` says step4
    assert (checkpoints / "latest").read_text().strip() == "step4"
    proc = run_cli(["train", str(config), "--stage", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step4: incomplete checkpoint" in proc.stderr and "at step 2" in proc.stderr
    reference, resumed = state(finished_run / "g1" / "train_stage1" / "model"), state(run_dir / "g1" / "train_stage1" / "model")
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


def test_nan_stops_with_the_last_good_checkpoint_which_resume_from_continues_with_a_lower_lr(finished_run, train_setup,
                                                                                          tmp_path):
    run_dir, config = copy_run(finished_run, train_setup, tmp_path, checkpoint_every=0, stage1=dict(steps=16))
    checkpoints = run_dir / "g1" / "train_stage1.checkpoints"
    # continued from the good step 4 with an absurd lr: the weights grow by ~lr a step until the forward overflows
    proc = run_cli(["train", str(config), "--stage", "1", "train.stage1.lr=1e12", "--resume-from",
                    str(checkpoints / "step4")])
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    match = re.search(r"non-finite (loss|gradient norm) .* at step (\d+); stopping, nothing exported. The last good "
                      r"checkpoint is (\S+) \(step 4\): to continue from it with other settings \(e\.g\. a lower "
                      r"learning rate\), add --resume-from (\S+)$", line)
    assert match and int(match.group(2)) > 5 and match.group(3) == match.group(4), line
    good = Path(match.group(3))
    assert (good / "layout.json").is_file() and ".stale-" in str(good)  # moved aside with its run, kept
    assert exported_steps(run_dir, "train_stage1") == 4  # nothing exported: the earlier result is untouched
    proc = run_cli(["train", str(config), "--stage", "1", "train.stage1.lr=0.001", "--resume-from", str(good)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "saved with other settings (--resume-from)" in proc.stderr and "steps 4..16" in proc.stderr
    assert (good / "layout.json").is_file()
    trained = state(run_dir / "g1" / "train_stage1" / "model")
    assert all(torch.isfinite(v).all() for v in trained.values()) and exported_steps(run_dir, "train_stage1") == 16
    manifest = json.loads((run_dir / "g1" / "train_stage1" / "manifest.json").read_text())
    assert manifest["summary"]["resumed_from"] == str(good) and manifest["config"]["stage"]["lr"] == 0.001


def test_a_non_finite_gradient_norm_with_a_finite_loss_stops_the_run_at_that_step(finished_run, train_setup, tmp_path):
    """A gradient that overflows while the loss stays finite (planted in a real run: from step 3 on, backward
    scales the loss's gradient by inf) stops the run at that step, names a checkpoint before it, exports nothing."""
    run_dir, config = copy_run(finished_run, train_setup, tmp_path, checkpoint_every=1, stage1=dict(steps=6))
    planted = f"""
import sys
from pipeline import cli, train
step_of, loss_of = train.train_step, train._micro_batch_loss
current = []
def train_step(run, trainer, step, routing):
    current.append(step)
    return step_of(run, trainer, step, routing)
def micro_batch_loss(*args):
    parts, records = loss_of(*args)
    if current[-1] >= 2:
        parts.total.register_hook(lambda grad: grad * float("inf"))
    return parts, records
train.train_step, train._micro_batch_loss = train_step, micro_batch_loss
sys.exit(cli.main(["train", {str(config)!r}, "--stage", "1"]))
"""
    proc = run_child([sys.executable, "-c", planted], cwd=ROOT, env=clean_env(), timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc.stderr)
    # (the loss is checked first: a finite loss at step 3, a non-finite gradient)
    assert re.search(r"non-finite gradient norm (nan|inf) at step 3; stopping, nothing exported\. The last good "
                     r"checkpoint is \S+step1 \(step 1\)", line), line
    assert exported_steps(run_dir, "train_stage1") == 4  # the earlier result is untouched


def test_a_corrupt_checkpoint_fingerprint_is_one_clear_error_and_nothing_moves(finished_run, train_setup, tmp_path):
    run_dir, config = copy_run(finished_run, train_setup, tmp_path)
    fingerprint = run_dir / "g1" / "train_stage1.checkpoints" / "fingerprint.json"
    fingerprint.write_bytes(b"\x00\xffgarbage")
    shutil.rmtree(run_dir / "g1" / "train_stage1")
    proc = run_cli(["train", str(config), "--stage", "1"])
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert f"checkpoint fingerprint {fingerprint} is not valid JSON" in line and "--resume-from" in line
    assert fingerprint.read_bytes() == b"\x00\xffgarbage" and not stale_dirs(run_dir, "train_stage1")


# ---------------------------------------------------------------------------------------------------------
# A stage is done only when its outputs are there
# ---------------------------------------------------------------------------------------------------------

def test_a_deleted_or_edited_stage_output_reruns_the_stage_and_says_why(run_config, tmp_path, capsys):
    assert main(["run", str(run_config), "--until", "allocate"]) == 0
    g1 = tmp_path / "runs" / "t" / "g1"
    (g1 / "analyze" / "similarity.json").unlink()
    capsys.readouterr()
    assert main(["run", str(run_config), "--until", "allocate"]) == 0
    err = capsys.readouterr().err
    assert "g1/analyze: output similarity.json is missing, re-running" in err
    assert (g1 / "analyze" / "similarity.json").is_file()
    allocation = json.loads((g1 / "allocate" / "allocation.json").read_text())
    (g1 / "allocate" / "allocation.json").write_text(json.dumps({**allocation, "experts_per_layer": [9, 9, 9, 9]}))
    assert main(["allocate", str(run_config), "--round", "g1"]) == 0
    assert "g1/allocate: output allocation.json is not what the stage wrote" in capsys.readouterr().err
    assert json.loads((g1 / "allocate" / "allocation.json").read_text()) == allocation


def test_temporaries_of_killed_processes_are_removed_or_put_back_and_nothing_else(run_config, tmp_path, capsys):
    assert main(["run", str(run_config), "--until", "analyze"]) == 0
    run_dir = tmp_path / "runs" / "t"
    ours = [run_dir / "g1" / ".allocate.k2j4_x9a.tmp", run_dir / "g1" / ".analyze.old-4242",
            run_dir / "g1" / "analyze" / ".similarity.json.abcd1234.tmp"]
    theirs = [run_dir / "g1" / "notes.tmp", run_dir / ".mine.tmp", run_dir / "g1" / ".cache"]
    moved_aside = run_dir / "g1" / ".report.old-4243"  # killed between the two renames: no g1/report any more
    for path in ours[:2] + theirs[2:] + [moved_aside]:
        path.mkdir()
        (path / "x").write_text("x")
    for path in ours[2:] + theirs[:2]:
        path.write_text("x")
    assert main(["run", str(run_config), "--until", "analyze"]) == 0
    err = capsys.readouterr().err
    assert "removed 3 temporary file(s) left by an interrupted run" in err
    assert "put back 1 output(s) that a killed run had moved aside to replace them: g1/report" in err
    assert not any(p.exists() for p in ours) and all(p.exists() for p in theirs)
    assert (run_dir / "g1" / "report" / "x").read_text() == "x" and not moved_aside.exists()


# ---------------------------------------------------------------------------------------------------------
# The run directory: marker and lock
# ---------------------------------------------------------------------------------------------------------

def test_start_over_refuses_a_directory_that_is_not_a_run(run_config, tmp_path, capsys):
    foreign = tmp_path / "paper"
    foreign.mkdir()
    (foreign / "draft.tex").write_text("\\section{Results}")
    (foreign / "results.csv").write_text("a,b\n1,2\n")
    for extra in (["--start-over"], []):
        assert main(["run", str(run_config), "--until", "analyze", f"run_dir={foreign}", *extra]) == 2
    err = capsys.readouterr().err
    assert f"--start-over deletes only run directories this project made: {foreign} is not a LayerMoE run directory" in err
    assert sorted(p.name for p in foreign.iterdir()) == ["draft.tex", "results.csv"]  # nothing written or deleted


def test_start_over_empties_a_run_directory_of_an_older_version(run_config, tmp_path, capsys):
    assert main(["run", str(run_config), "--until", "analyze"]) == 0
    run_dir = tmp_path / "runs" / "t"
    (run_dir / MARKER).unlink()  # made before the marker existed: recognised by its run config.json
    assert main(["run", str(run_config), "--until", "analyze"]) == 0
    assert "a run directory of an older version" in capsys.readouterr().err and (run_dir / MARKER).is_file()
    (run_dir / MARKER).unlink()
    assert main(["run", str(run_config), "--until", "analyze", "--start-over", "analyze.batch_size=2"]) == 0
    assert "--start-over: deleting the contents of" in capsys.readouterr().err
    assert (run_dir / MARKER).is_file() and (run_dir / "g1" / "analyze" / "similarity.json").is_file()


HOLD_LOCK = """
import sys, time
from pipeline.run_lock import run_lock
with run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(300)
"""


def test_a_second_run_on_a_directory_in_use_is_refused_until_the_holder_dies(run_config, tmp_path, capsys):
    run_dir = tmp_path / "runs" / "t"
    run_dir.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["run", str(run_config), "--until", "analyze"]) == 2
        err = capsys.readouterr().err
        assert f"run directory {run_dir} is in use by another run (pid {holder.pid} on host" in err
        assert not (run_dir / "g1").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # the kernel releases a dead holder's lock
        holder.wait()
    assert main(["run", str(run_config), "--until", "analyze"]) == 0


# ---------------------------------------------------------------------------------------------------------
# Stop signals
# ---------------------------------------------------------------------------------------------------------

def start_and_signal(command: list[str], send, when: str = r"stage 1 step 3/") -> tuple[int, str]:
    """Start ``command`` (stderr piped); once a stderr line matches ``when``, call ``send(process)``; return its exit
    status and stderr."""
    proc = subprocess.Popen(command, cwd=ROOT, env=clean_env(), stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if re.search(when, line):
            send(proc)
            break
    lines += proc.stderr.readlines()
    return proc.wait(timeout=300), "".join(lines)


def stopped_step(stderr: str) -> int:
    match = re.search(r"stopped by (SIGTERM|SIGUSR1|a stop signal)[^\n]* after step (\d+) of", stderr)
    assert match, stderr[-3000:]
    return int(match.group(2))


LONG = dict(stage1=dict(steps=200), checkpoint_every=0)  # the only checkpoint before the end: the one a signal asks for


def test_sigterm_saves_a_checkpoint_at_the_next_step_and_the_rerun_ends_bit_identical(finished_run, train_setup,
                                                                                       tmp_path):
    reference_dir, reference = copy_run(finished_run, train_setup, tmp_path / "reference", **LONG)
    assert run_cli(["train", str(reference), "--stage", "1"]).returncode == 0
    run_dir, config = copy_run(finished_run, train_setup, tmp_path / "stopped", **LONG)
    status, err = start_and_signal([sys.executable, "-m", "pipeline.cli", "train", str(config), "--stage", "1"],
                                   lambda p: p.send_signal(signal.SIGTERM))
    assert status == EXIT_STOPPED, err[-3000:]
    step = stopped_step(err)
    assert 3 <= step <= 4  # the step in flight when the signal came (or the next one) ends, then the checkpoint
    assert (run_dir / "g1" / "train_stage1.checkpoints" / f"step{step}" / "layout.json").is_file()
    assert exported_steps(run_dir, "train_stage1") == 4  # nothing exported: the earlier 4-step result is untouched
    proc = run_cli(["train", str(config), "--stage", "1"])
    assert proc.returncode == 0 and f"at step {step}" in proc.stderr, proc.stderr[-3000:]
    a, b = state(reference_dir / "g1" / "train_stage1" / "model"), state(run_dir / "g1" / "train_stage1" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)


def torchrun_command(config: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "stages/train.py", "--config", str(config), "--stage", "1"]


def rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of the ranks a launcher started (from their environment)."""
    import psutil

    ranks = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except psutil.Error:
            continue
        if rank is not None and "stages/train.py" in " ".join(child.cmdline()):
            ranks[int(rank)] = child.pid
    return ranks


def test_stop_signals_reach_two_ranks_which_agree_save_and_resume_bit_identical(finished_run, train_setup, tmp_path):
    """2 gloo ranks: SIGTERM to `layermoe run` (forwarded through the DeepSpeed launcher), then SIGUSR1 to rank 1
    alone under torchrun (both ranks stop at the same step); the resumed run equals an uninterrupted one."""
    reference_dir, reference = copy_run(finished_run, train_setup, tmp_path / "reference", **LONG)
    proc = run_child(torchrun_command(reference), cwd=ROOT, env=clean_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir, config = copy_run(finished_run, train_setup, tmp_path / "stopped", **LONG)
    checkpoints = run_dir / "g1" / "train_stage1.checkpoints"
    run = [sys.executable, "-m", "pipeline.cli", "run", str(config), "--only", "train_stage1",
           "launch.processes_per_node=2"]
    status, err = start_and_signal(run, lambda p: p.send_signal(signal.SIGTERM))
    assert status == EXIT_STOPPED, err[-3000:]
    first = stopped_step(err)
    assert json.loads((checkpoints / f"step{first}" / "layout.json").read_text())["world_size"] == 2

    def usr1_to_rank_1(launcher):
        for _ in range(100):
            if 1 in (ranks := rank_pids(launcher)):
                os.kill(ranks[1], signal.SIGUSR1)
                return
            time.sleep(0.1)
        raise AssertionError("rank 1 not found")

    status, err = start_and_signal(torchrun_command(config), usr1_to_rank_1, rf"stage 1 step {first + 3}/")
    assert status != 0 and f"at step {first}" in err, err[-3000:]
    second = stopped_step(err)
    assert second > first and (checkpoints / f"step{second}" / "layout.json").is_file()
    # both ranks stopped after the same step: rank 1 got the signal, rank 0 learnt it at the step boundary
    assert err.count(f"after step {second} of") == 2, err[-3000:]
    assert "stopped by SIGUSR1 (here or on another rank)" in err and "stopped by a stop signal on another rank" in err
    proc = run_cli(["run", str(config), "--only", "train_stage1", "launch.processes_per_node=2"])
    assert proc.returncode == 0 and f"at step {second}" in proc.stderr, proc.stderr[-3000:]
    a, b = state(reference_dir / "g1" / "train_stage1" / "model"), state(run_dir / "g1" / "train_stage1" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigint_stops_with_status_130_and_leaves_no_partial_stage(run_config, tmp_path):
    status, err = start_and_signal([sys.executable, "-m", "pipeline.cli", "run", str(run_config), "--until", "analyze",
                                    "analyze.tokens_per_language=200000", "analyze.batch_size=1"],
                                   lambda p: p.send_signal(signal.SIGINT), when=r"g1/analyze: starting")
    assert status == EXIT_INTERRUPTED and "interrupted (SIGINT)" in err, err[-3000:]
    g1 = tmp_path / "runs" / "t" / "g1"
    assert not (g1 / "analyze").exists() and not list(g1.glob(".*"))


# ---------------------------------------------------------------------------------------------------------
# Bad input: one clear line, exit status 2, nothing lost
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"{}", b"\x89PNG\x00\xff\xfe binary"])
def test_a_run_config_json_that_is_empty_or_binary_is_one_clear_error(run_config, tmp_path, capsys, content):
    assert main(["run", str(run_config), "--until", "analyze"]) == 0
    saved = tmp_path / "runs" / "t" / "config.json"
    saved.write_bytes(content)
    capsys.readouterr()
    assert main(["run", str(run_config), "--until", "analyze"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"run config {saved}" in line and "--start-over" in line
    assert saved.read_bytes() == content and (saved.parent / "g1" / "analyze" / "similarity.json").is_file()


@pytest.mark.parametrize("content", [b"\x00\x01\xfe\xff garbage", b"[1, 2, 3]", b'{"stage": "analyze"}'])
def test_a_manifest_of_garbage_or_of_the_wrong_shape_is_one_clear_error(run_config, tmp_path, capsys, content):
    assert main(["run", str(run_config), "--until", "analyze"]) == 0
    manifest = tmp_path / "runs" / "t" / "g1" / "analyze" / "manifest.json"
    manifest.write_bytes(content)
    capsys.readouterr()
    assert main(["analyze", str(run_config)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"stage manifest {manifest}" in line and "delete" in line
    assert manifest.read_bytes() == content


def test_a_corrupt_evaluate_cache_entry_is_a_miss_with_a_warning(tmp_path, capsys):
    cache = ResultCache(tmp_path)
    score = LanguageScore(12.5, 100, None)
    (tmp_path / "k.json").write_bytes(b"\xff\xfe not json")
    assert cache.get("k", LanguageScore.from_json) is None
    (tmp_path / "k.json").write_text('{"perplexity": 1}')  # valid JSON, wrong shape
    assert cache.get("k", LanguageScore.from_json) is None
    assert capsys.readouterr().err.count("evaluate cache entry") == 2
    cache.put("k", score.to_json())
    assert cache.get("k", LanguageScore.from_json) == score


@pytest.mark.parametrize("content, message", [(b"", "is empty"),
                                              (b"plain text, not parquet\n", "cannot read corpus")])
def test_an_empty_or_unreadable_corpus_file_is_one_clear_error(run_config, tmp_path, capsys, content, message):
    bad = tmp_path / "data" / "bad.parquet" if content else tmp_path / "data" / "empty.jsonl"
    bad.write_bytes(content)
    assert main(["tokenize", str(run_config), f"data.sources.el.path={bad}", f"run_dir={tmp_path / 'other'}"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(bad) in line and message in line and "'el'" in line
    assert not (tmp_path / "other" / "g1" / "tokenize").exists()


def test_a_missing_base_model_directory_says_what_is_missing(run_config, tmp_path, capsys):
    assert main(["run", str(run_config), f"model.path={tmp_path / 'nowhere'}"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"model.path: the base model directory '{tmp_path / 'nowhere'}' does not exist" in line
    assert "earlier stages" not in line


def test_top_k_above_every_layers_expert_count_is_refused_at_allocate(run_config, tmp_path, capsys):
    assert main(["run", str(run_config), "--until", "allocate", "upcycle.top_k=10"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "upcycle.top_k: 10 is larger than every layer's expert count" in line and "allocation of g1" in line
    assert not (tmp_path / "runs" / "t" / "g1" / "allocate").exists()


def mount_namespace_problem() -> str | None:
    """Why this process cannot mount a tmpfs or a read-only bind in a private mount namespace (None if it can)."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True,
                           text=True)
    return None if probe.returncode == 0 else f"cannot mount in a private mount namespace: {probe.stderr.strip()}"


requires_mounts = pytest.mark.skipif(mount_namespace_problem() is not None, reason=str(mount_namespace_problem()))


def in_mount_namespace(script: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a bash ``script`` in a private mount namespace (its mounts vanish with it)."""
    return run_child(["unshare", "-m", "bash", "-euc", script], cwd=ROOT, env=env or clean_env(), timeout=600)


def full_disk_then_rerun(run_dir: Path, cli: str, size_kib: int, out: Path, after: str = "") -> None:
    """In a private mount namespace: ``run_dir`` (its content kept) on a tmpfs of ``size_kib`` KiB, ``cli`` once
    (stderr to ``out``/full.err, a failing status to full.status, the files it left to full.files), the tmpfs grown
    to 64 MiB, ``cli`` again (rerun.err, rerun.status), then the bash lines ``after``."""
    saved = out / "saved"
    proc = in_mount_namespace(f"""
        cp -a {run_dir} {saved}
        mount -t tmpfs -o size={size_kib}k tmpfs {run_dir}
        cp -a {saved}/. {run_dir}/
        {cli} 2> {out}/full.err || echo $? > {out}/full.status
        (cd {run_dir} && find . | sort) > {out}/full.files
        mount -o remount,size=64m {run_dir}
        {cli} 2> {out}/rerun.err; echo $? > {out}/rerun.status
        {after}
        """)
    assert proc.returncode == 0, proc.stderr[-3000:]


@requires_mounts
def test_a_read_only_stage_directory_is_one_clear_error(run_config, tmp_path):
    assert main(["run", str(run_config), "--until", "analyze"]) == 0
    g1 = tmp_path / "runs" / "t" / "g1"
    proc = in_mount_namespace(f"mount --bind {g1} {g1}; mount -o remount,bind,ro {g1}; "
                              f"exec {sys.executable} -m pipeline.cli allocate {run_config}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc.stderr)
    assert f"cannot write {g1}/" in line and "Read-only file system" in line
    assert sorted(p.name for p in g1.iterdir()) == ["analyze", "tokenize"]


def tmpfs_kib(path: Path) -> int:
    """What ``path``'s files take on a tmpfs, in KiB (whole 4 KiB pages)."""
    return sum(-(-p.stat().st_size // 4096) * 4 for p in path.rglob("*") if p.is_file())


@requires_mounts
def test_a_full_disk_while_saving_a_model_is_one_clear_error_and_the_rerun_recovers(run_config, tmp_path):
    assert main(["run", str(run_config), "--until", "allocate"]) == 0
    run_dir = tmp_path / "runs" / "t"
    size_kib = tmpfs_kib(run_dir) + 48  # room for the run's bookkeeping, not for the expanded model (> 64 KiB)
    out = tmp_path / "out"
    out.mkdir()
    full_disk_then_rerun(run_dir, f"{sys.executable} -m pipeline.cli run {run_config} --until upcycle", size_kib, out)
    assert (out / "full.status").read_text().strip() == "2"
    line = one_error_line((out / "full.err").read_text())
    assert f"cannot write {run_dir}/g1/.upcycle." in line and "No space left on device" in line  # its temporary
    assert "MiB free there" in line
    files = (out / "full.files").read_text().split()
    assert not [f for f in files if "upcycle" in f or f.endswith(".tmp")]  # nothing half-written
    rerun = (out / "rerun.err").read_text()
    assert (out / "rerun.status").read_text().strip() == "0", rerun[-3000:]
    assert "g1/analyze: up to date" in rerun and "g1/allocate: up to date" in rerun and "g1/upcycle: done" in rerun


@requires_mounts
def test_a_full_disk_while_saving_a_checkpoint_is_one_clear_error_and_the_rerun_ends_bit_identical(
        finished_run, train_setup, tmp_path):
    run_dir, config = copy_run(finished_run, train_setup, tmp_path)
    shutil.rmtree(run_dir / "g1" / "train_stage1")
    shutil.rmtree(run_dir / "g1" / "train_stage1.checkpoints")
    shutil.rmtree(run_dir / "g1" / "train_stage2")
    shutil.rmtree(run_dir / "g1" / "train_stage2.checkpoints")
    checkpoint_kib = (finished_run / "g1" / "train_stage1.checkpoints" / "step2" / "mp_rank_00_model_states.pt").stat().st_size // 1024
    size_kib = tmpfs_kib(run_dir) + checkpoint_kib // 2 + 64  # the first checkpoint does not fit
    out = tmp_path / "out"
    out.mkdir()
    full_disk_then_rerun(run_dir, f"{sys.executable} -m pipeline.cli train {config} --stage 1", size_kib, out,
                         after=f"cp {run_dir}/g1/train_stage1/model/model.safetensors {out}/")
    assert (out / "full.status").read_text().strip() == "2"
    line = one_error_line((out / "full.err").read_text())
    assert f"cannot write {run_dir}/g1/train_stage1.checkpoints/step2" in line and "MiB free there" in line
    files = (out / "full.files").read_text().split()
    assert "./g1/train_stage1.checkpoints/step2/layout.json" not in files and "./g1/train_stage1" not in files
    assert (out / "rerun.status").read_text().strip() == "0", (out / "rerun.err").read_text()[-3000:]
    from safetensors.torch import load_file

    a, b = state(finished_run / "g1" / "train_stage1" / "model"), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
