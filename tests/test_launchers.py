"""Every launcher starts a stage in 2 processes on CPU, and the result equals the 1-process result.

Launchers: the DeepSpeed launcher (as typed, and through ``run_stage_in_processes``), torchrun, mpirun, srun.
Also rank discovery from launcher variables, and the Slurm preflight."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import LAUNCHER_VARIABLES, clean_env, make_tiny_model, run_child, synthetic_documents, write_jsonl
from pipeline import cluster, ranks
from pipeline.errors import LayerMoEError
from pipeline.launch import StageProcessesFailed, launch_stage_command, run_stage_in_processes
from pipeline.ranks import discover_ranks, free_port
from pipeline.run_dir import MARKER
from pipeline.stages import get_stage
from test_slurm import slurm_problem
from test_train import assert_same_weights, prepare, state, write_config

ROOT = Path(__file__).resolve().parents[1]
@pytest.fixture(scope="module")
def analyze_setup(tmp_path_factory, tokenizer_dir) -> tuple[Path, dict]:
    """A tiny analyze config and its 1-process similarity.json (after the tokenize stage, also in 1 process)."""
    root = tmp_path_factory.mktemp("launchers")
    model = make_tiny_model(root / "model", "llama", tokenizer_dir, seed=3, layers=3)
    sources = {lang: {"path": str(write_jsonl(root / f"{lang}.jsonl", synthetic_documents(lang, 40, seed=9)))}
               for lang in ("en", "el", "hu")}
    config = root / "run.yaml"
    config.write_text(json.dumps({
        "name": "t", "run_dir": str(root / "single"), "cache_dir": str(root / "cache"), "old_languages": ["en"],
        "rounds": [{"name": "g1", "languages": ["el", "hu"]}], "model": {"path": str(model)},
        "data": {"builtin_corpus": "none", "sources": sources},
        "analyze": {"tokens_per_language": 300, "batch_size": 4, "max_length": 48},
        "allocate": {"method": "reference", "delta": 5, "classifier_count": 1},
        "evaluate": {"block_length": 32},  # the tokenize stage checks that the held-out text holds a block
    }))
    for script in ("stages/tokenize_corpus.py", "stages/analyze.py"):
        subprocess.run([sys.executable, script, "--config", str(config)], check=True, cwd=ROOT, env=clean_env(),
                       capture_output=True, timeout=300)
    return config, json.loads((root / "single" / "g1" / "analyze" / "similarity.json").read_text())


def tokenized(config: Path, run_dir: Path) -> Path:
    """``run_dir`` with the 1-process run's tokenize stage (its stores.json names the stores in the shared cache),
    marked as a run directory like the one it comes from."""
    shutil.copytree(config.parent / "single" / "g1" / "tokenize", run_dir / "g1" / "tokenize")
    shutil.copyfile(config.parent / "single" / MARKER, run_dir / MARKER)
    return run_dir


def assert_same_similarity(single: dict, run_dir: Path) -> None:
    multi = json.loads((run_dir / "g1" / "analyze" / "similarity.json").read_text())
    assert multi["tokens"] == single["tokens"]
    for key in single["pairs"]:  # batches differ per rank: equal up to float64 summation order
        assert max(abs(x - y) for x, y in zip(single["pairs"][key], multi["pairs"][key])) < 1e-7


def launcher_command(launcher: str) -> list[str]:
    """The launcher's own command line for 2 local processes, up to the script."""
    bin_dir = Path(sys.executable).parent
    if launcher == "deepspeed":
        return [str(bin_dir / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    if launcher == "torchrun":
        return [str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())]
    if launcher == "mpirun":
        return ["mpirun", "-n", "2", *(["--allow-run-as-root"] if os.geteuid() == 0 else []), sys.executable]
    return ["srun", "--ntasks=2", "--overcommit", "--time=10", sys.executable]  # 2 tasks even on a 1-CPU node


def launcher_missing(launcher: str) -> str | None:
    if launcher == "mpirun" and shutil.which("mpirun") is None:
        return "mpirun is not installed (apt-get install openmpi-bin)"
    return slurm_problem() if launcher == "srun" else None


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun", "mpirun", "srun"])
def test_launcher_two_processes_match_one(analyze_setup, tmp_path, launcher):
    if reason := launcher_missing(launcher):
        pytest.skip(reason)
    config, single = analyze_setup
    run_dir = tokenized(config, tmp_path / launcher)
    command = [*launcher_command(launcher), "stages/analyze.py", "--config", str(config), f"run_dir={run_dir}"]
    proc = run_child(command, cwd=ROOT, env=clean_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    per_rank = [int(n) for n in re.findall(r"(\d+)/\d+ tokens on this rank", proc.stderr)]
    assert per_rank and max(per_rank) < 300  # rank 0 read only its share of each language's 300 tokens
    assert_same_similarity(single, run_dir)


def test_run_stage_in_processes_matches_one_and_reports_failure(analyze_setup, tmp_path, monkeypatch):
    config, single = analyze_setup
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    analyze = get_stage("analyze")
    run_stage_in_processes("analyze", analyze.entry_argv, config, "g1", [f"run_dir={tokenized(config, tmp_path / 'ok')}"],
                           2)
    assert_same_similarity(single, tmp_path / "ok")
    with pytest.raises(StageProcessesFailed, match="analyze \\(g1\\) failed in 2 processes with exit code 2") as e:
        run_stage_in_processes("analyze", analyze.entry_argv, config, "g1",
                               [f"run_dir={tmp_path / 'bad'}", "analyze.batch_size=0"], 2)
    assert e.value.returncode == 2 and not (tmp_path / "bad").exists()


def cluster_stage(stage: str, config: Path, run_dir: Path, *options: str) -> subprocess.Popen:
    """``python -m pipeline.cluster stage ...`` as slurm/expand.sh runs it on a node (here: on this machine)."""
    return subprocess.Popen([sys.executable, "-m", "pipeline.cluster", "stage", stage, "--config", str(config),
                             "--round", "g1", *options, f"run_dir={run_dir}"], cwd=ROOT, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_training_on_two_nodes_equals_one_node_with_two_processes(train_setup, tmp_path):
    """slurm/expand.sh's multi-node path on one machine, one `python -m pipeline.cluster stage` per "node": stage 1
    with expert parallelism across the "nodes" (ep_size 2, ZeRO-2): two DeepSpeed launchers
    (--num_nodes 2 --node_rank 0|1 --no_ssh, a hostfile of two names for this machine) x 1 process give the
    weights of one launcher with 2 processes."""
    config = write_config(train_setup, tmp_path / "prepared", ds_config="ds_configs/zero2_fp32.json", ep_size=2,
                          stage1=dict(steps=4, micro_batch_size=2))
    prepare(config)
    for name in ("one_node", "two_nodes"):
        shutil.copytree(tmp_path / "prepared", tmp_path / name)
    one = cluster_stage("train_stage1", config, tmp_path / "one_node", "--processes-per-node", "2", "--master-port",
                        str(free_port()))
    output = one.communicate(timeout=600)[0]
    assert one.returncode == 0, output[-3000:]
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port = str(free_port())
    nodes = [cluster_stage("train_stage1", config, tmp_path / "two_nodes", "--nodes", "2", "--node-rank", str(rank),
                           "--master-addr", "127.0.0.1", "--master-port", port, "--hostfile", str(hostfile))
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "nnodes=2, num_local_procs=1, node_rank=1" in outputs[1] and "world 2, ep_size 2" in outputs[0]
    trained = [tmp_path / name / "g1" / "train_stage1" / "model" for name in ("one_node", "two_nodes")]
    assert_same_weights(*trained, exact=True)
    assert any(not torch.equal(v, state(trained[0])[k])
               for k, v in state(tmp_path / "prepared" / "g1" / "upcycle" / "model").items())


def test_launch_stage_command():
    cmd = launch_stage_command(get_stage("train_stage2").entry_argv, "c.yaml", "g1", ["a.b=1"], 4, master_port=29555,
                               force=True)
    assert cmd[1:] == ["-m", "deepspeed.launcher.runner", "--num_gpus", "4", "--master_addr", "127.0.0.1",
                       "--master_port", "29555", str(ROOT / "stages" / "train.py"), "--stage", "2",
                       "--config", "c.yaml", "--round", "g1", "--force", "a.b=1"]
    analyze = get_stage("analyze").entry_argv
    multi = launch_stage_command(analyze, "c.yaml", None, [], 8, nodes=2, node_rank=1, master_addr="n1",
                                 master_port=29555, hostfile="hosts")
    assert multi[multi.index("--hostfile"):multi.index(str(ROOT / "stages" / "analyze.py"))] == [
        "--hostfile", "hosts", "--no_ssh", "--node_rank", "1", "--num_nodes", "2"]
    with pytest.raises(LayerMoEError, match="hostfile and a master port"):
        launch_stage_command(analyze, "c.yaml", nodes=2)
    with pytest.raises(LayerMoEError, match="entry point .*nonexistent.py does not exist"):
        launch_stage_command([str(ROOT / "stages" / "nonexistent.py")], "c.yaml")
    with pytest.raises(LayerMoEError, match="unknown stage 'nonexistent'"):
        get_stage("nonexistent")


def set_env(monkeypatch, **variables: str) -> None:
    """Exactly these launcher-related variables; all of them are restored after the test."""
    for name in LAUNCHER_VARIABLES:  # set first so that monkeypatch also undoes what discover_ranks exports
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    for name in list(os.environ):
        if name.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_")):
            monkeypatch.delenv(name)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


def test_discover_ranks_from_slurm_variables(monkeypatch):
    step = dict(SLURM_JOB_ID="812", SLURM_STEP_ID="3", SLURM_PROCID="3", SLURM_LOCALID="1", SLURM_STEP_NUM_TASKS="4",
                SLURM_STEP_NUM_NODES="1", SLURM_STEP_NODELIST="node7")
    set_env(monkeypatch, **step)
    assert discover_ranks() == ranks.Ranks(3, 4, 1, "slurm")
    assert {k: os.environ[k] for k in LAUNCHER_VARIABLES} == {
        "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(ranks.slurm_port(812, 3))}
    assert discover_ranks() == ranks.Ranks(3, 4, 1, "env")  # a second call reads what the first exported

    set_env(monkeypatch, **step, MASTER_ADDR="10.0.0.5", MASTER_PORT="29999")  # configured rendezvous is kept
    discover_ranks()
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("10.0.0.5", "29999")

    # a batch script has SLURM_PROCID/SLURM_NTASKS but is one process: no SLURM_STEP_* variables
    set_env(monkeypatch, SLURM_JOB_ID="812", SLURM_PROCID="0", SLURM_NTASKS="4")
    assert discover_ranks() == ranks.Ranks(0, 1, 0, "none") and "RANK" not in os.environ


def test_preflight_lists_finished_stages_and_refuses_bf16_without_gpus(analyze_setup, monkeypatch, capsys):
    config, _ = analyze_setup
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("LAYERMOE_PROCS_PER_NODE", "3")
    assert cluster.main(["preflight", str(config)]) == 0
    out = capsys.readouterr().out
    assert "rounds=g1\n" in out and "processes_per_node=3\n" in out and "gpus_per_node=0\n" in out
    assert "finished=g1/tokenize g1/analyze" in out  # what slurm/expand.sh does not launch
    assert cluster.main(["preflight", str(config), "analyze.tokens_per_language=200"]) == 0
    assert "finished=g1/tokenize\n" in capsys.readouterr().out  # analyze would run again, and all after it
    assert cluster.main(["preflight", str(config), "train.ds_config=ds_configs/zero1_bf16.json"]) == 2
    assert "this node has no GPUs" in capsys.readouterr().err
