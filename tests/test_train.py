"""Training stages on tiny random models: losses, what is trained, routing behaviour, resume, multi-process."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model, synthetic_documents, write_jsonl
from pipeline.base_model import load_causal_lm
from pipeline.hf_modeling.modeling_layermoe import RoutingRecord
from pipeline.ranks import free_port
from pipeline.losses import (HiddenStates, classifier_loss, load_balance, lpr, next_token_loss, next_token_loss_sum,
                             stage_loss)
from pipeline.upcycle import parameter_roles

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------
# loss formulas against hand-computed values
# ---------------------------------------------------------------------------------------------------------

def record(logits, indices, valid=None, classifier_logits=None, sent=None) -> RoutingRecord:
    logits = torch.tensor(logits, dtype=torch.float32)
    n = logits.shape[0]
    probs = torch.softmax(logits, -1)
    indices = torch.tensor(indices)
    weights = probs.gather(1, indices)
    return RoutingRecord(logits, indices, weights / weights.sum(-1, keepdim=True),
                         torch.ones(n, dtype=torch.bool) if valid is None else torch.tensor(valid),
                         None if classifier_logits is None else torch.tensor(classifier_logits, dtype=torch.float32),
                         None if sent is None else torch.tensor(sent))


def test_load_balance_by_hand():
    r = record([[0.0, 0.0, 0.0], [math.log(2), 0.0, 0.0]], [[0, 1], [0, 2]])
    # f = slots (2, 1, 1) / 4; P = mean of (1/3,1/3,1/3) and (1/2,1/4,1/4)
    f = torch.tensor([0.5, 0.25, 0.25])
    p = torch.tensor([(1 / 3 + 1 / 2) / 2, (1 / 3 + 1 / 4) / 2, (1 / 3 + 1 / 4) / 2])
    assert load_balance(r).item() == pytest.approx(3 * float((f * p).sum()), rel=1e-6)
    # perfect balance is 1 whatever E is
    for e in (2, 3, 5):
        logits = torch.zeros(e, e).tolist()
        idx = [[i % e, (i + 1) % e] for i in range(e)]
        assert load_balance(record(logits, idx)).item() == pytest.approx(1.0, rel=1e-6)
    # padding and classifier-gated tokens do not count
    gated = record([[0.0, 0.0, 0.0], [5.0, 0.0, 0.0]], [[0, 1], [0, 2]], valid=[True, True], sent=[False, True],
                   classifier_logits=[[0.0, 1.0], [1.0, 0.0]])
    only_first = record([[0.0, 0.0, 0.0]], [[0, 1]])
    assert load_balance(gated).item() == pytest.approx(load_balance(only_first).item())


def test_lpr_forms_by_hand():
    r = record([[math.log(3), 0.0], [0.0, 0.0], [2.0, 1.0]], [[0, 1]] * 3)
    original = torch.tensor([True, False, True])
    p0 = [3 / 4, 1 / (1 + math.exp(-1))]
    assert lpr(r, original, "paper").item() == pytest.approx(-(math.log(p0[0]) + math.log(p0[1])) / 2, rel=1e-6)
    double = [-math.log(math.exp(p) / (math.exp(p) + math.exp(1 - p))) for p in p0]
    assert lpr(r, original, "double_softmax").item() == pytest.approx(sum(double) / 2, rel=1e-6)
    assert lpr(r, torch.tensor([False] * 3)).item() == 0.0


def test_classifier_and_ce_by_hand():
    r = record([[0.0, 0.0]] * 2, [[0, 1]] * 2, classifier_logits=[[2.0, 0.0], [0.0, 0.0]], sent=[True, False])
    original = torch.tensor([True, False])  # labels OLD, NEW
    expected = (-math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(2)) / 2
    assert classifier_loss(r, original).item() == pytest.approx(expected, rel=1e-6)
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = math.log(3)  # p(target=2) = 3/6
    ids = torch.tensor([[1, 2, 3]])
    assert next_token_loss(logits, ids).item() == pytest.approx((math.log(2) + math.log(4)) / 2, rel=1e-6)


def test_stage_loss_combines_terms():
    r = record([[1.0, 0.0, 0.5]] * 4, [[0, 2]] * 4, classifier_logits=[[0.3, 0.1]] * 4, sent=[True] * 4)
    logits, ids = torch.randn(1, 4, 7), torch.randint(0, 7, (1, 4))
    original = torch.tensor([[True, False, True, True]])
    s1 = stage_loss(1, logits, ids, {0: r}, original, alpha=0.5)
    assert s1.total.item() == pytest.approx(s1.ce.item() + 0.5 * s1.balance.item())
    s2 = stage_loss(2, logits, ids, {0: r}, original, gamma=0.2, beta=0.3)
    assert s2.total.item() == pytest.approx(s2.ce.item() + 0.2 * s2.lpr.item() + 0.3 * s2.classifier.item())


@pytest.mark.parametrize("chunk", [1, 10, 37, 0])
def test_chunked_cross_entropy_equals_full_logits(chunk):
    """The LM head applied a chunk at a time (recomputed in the backward) = full logits: loss and every gradient."""
    g = torch.Generator().manual_seed(chunk)
    hidden = torch.randn(3, 19, 16, generator=g, requires_grad=True)
    head = torch.nn.Linear(16, 50)
    ids = torch.randint(0, 50, (3, 19), generator=g)
    valid = torch.rand(3, 19, generator=g) > 0.3
    results = []
    for prediction in (head(hidden), HiddenStates(hidden, head, chunk)):
        loss = next_token_loss(prediction, ids, valid)
        results.append((loss, torch.autograd.grad(loss, [hidden, head.weight, head.bias])))
    (loss, grads), (chunked_loss, chunked_grads) = results
    assert abs(chunked_loss.item() - loss.item()) <= 1e-6
    for got, expected in zip(chunked_grads, grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    total, count = next_token_loss_sum(HiddenStates(hidden.detach(), head, chunk), ids, valid)
    assert count == valid[:, 1:].sum() and total.item() == pytest.approx(loss.item() * count.item(), rel=1e-6)


@pytest.mark.parametrize("training_stage", [1, 2])
def test_chunked_loss_and_activation_checkpointing_keep_the_loss_and_gradients(training_stage):
    """On a tiny two-round model with a classifier: the stage's loss parts and every trainable gradient are those
    of full logits without checkpointing, for the chunked loss alone and with activation checkpointing."""
    from test_expert_parallel import two_round_model

    from pipeline.hf_modeling.modeling_layermoe import moe_blocks, output_logits
    from pipeline.train import enable_activation_checkpointing, trainable_roles
    from pipeline.upcycle import set_trainable

    ids = torch.randint(4, 400, (3, 16), generator=torch.Generator().manual_seed(5))
    original = torch.tensor([[True] * 16, [False] * 16, [True] * 16])
    results = {}
    for variant in ("logits", "chunked", "chunked + checkpointing"):
        model = two_round_model()
        set_trainable(model, trainable_roles(training_stage, 2))
        if variant.endswith("checkpointing"):
            enable_activation_checkpointing(model)
        model.train()
        if variant == "logits":
            prediction = model(input_ids=ids, use_cache=False).logits
        else:
            hidden = model(input_ids=ids, use_cache=False, hidden_states_only=True).last_hidden_state
            prediction = HiddenStates(hidden, lambda x, model=model: output_logits(model, x), 5)
        records = {i: b.last_routing for i, b in moe_blocks(model).items()}
        parts = stage_loss(training_stage, prediction, ids, records, original)
        parts.total.backward()
        results[variant] = (parts.as_floats(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    losses, grads = results["logits"]
    assert len(losses) == (3 if training_stage == 1 else 4) and all(g is not None for g in grads.values())
    for variant in ("chunked", "chunked + checkpointing"):
        assert results[variant][0] == pytest.approx(losses, rel=1e-6), variant
        for name, grad in grads.items():
            torch.testing.assert_close(results[variant][1][name], grad, rtol=1e-5, atol=1e-7, msg=f"{variant}: {name}")


# ---------------------------------------------------------------------------------------------------------
# training runs (tiny model, real DeepSpeed engine)
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def train_setup(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("train")
    make_tiny_model(root / "dense", "llama", tokenizer_dir, seed=2, layers=2)
    for lang in ("en", "el", "hu"):
        write_jsonl(root / f"{lang}.jsonl", synthetic_documents(lang, 300, seed=11))
    return root


def write_config(root: Path, run_dir: Path, **train) -> Path:
    stage1 = dict(steps=30, lr=0.003, warmup_steps=2, micro_batch_size=4, block_length=48, tokens_per_language=15000)
    stage2 = dict(steps=40, lr=0.05, warmup_steps=2, micro_batch_size=4, block_length=48, tokens_per_language=6000,
                  replay_tokens_per_language=6000)
    stage1.update(train.pop("stage1", {}))
    stage2.update(train.pop("stage2", {}))
    body = {
        "name": "t", "run_dir": str(run_dir), "old_languages": ["en"],
        "rounds": [{"name": "g1", "languages": ["el", "hu"]}],
        "model": {"path": str(root / "dense")},
        "data": {"builtin_corpus": "none", "sources": {l: {"path": str(root / f"{l}.jsonl")} for l in ("en", "el", "hu")}},
        "analyze": {"tokens_per_language": 300, "max_length": 48},
        "evaluate": {"tokens_per_language": 960, "block_length": 48, "translation_sentences": 0},
        "allocate": {"method": "explicit", "explicit": [3, 2], "classifier_layers": [0, 1]},
        "train": {"stats_every": 10, "stage1": stage1, "stage2": stage2, **train},
    }
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(json.dumps(body))
    return path


def clean_env() -> dict:
    """This process's environment without launcher variables other tests may have left behind."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    return {**env, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}


def run_cli(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = clean_env()
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, **kwargs)


def prepare(config: Path) -> None:
    """analyze, allocate and upcycle: the stages before training."""
    proc = run_cli(["run", str(config), "--until", "upcycle"])
    assert proc.returncode == 0, proc.stderr[-3000:]


def eval_loss(model_dir: Path, root: Path, lang: str) -> float:
    from pipeline.packing import load_tokenizer, pack_documents

    model = load_causal_lm(model_dir)
    blocks = pack_documents([(0, t) for t in synthetic_documents(lang, 40, seed=99)], load_tokenizer(model_dir), 48, [lang],
                            max_blocks=16)
    with torch.no_grad():
        return next_token_loss(model(blocks.input_ids).logits, blocks.input_ids).item()


def test_stage1_then_stage2_in_process(train_setup, tmp_path):
    run_dir = tmp_path / "run"
    config = write_config(train_setup, run_dir)
    proc = run_cli(["run", str(config)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    g1 = run_dir / "g1"
    upcycled = load_causal_lm(g1 / "upcycle" / "model")
    stage1 = load_causal_lm(g1 / "train_stage1" / "model")
    stage2 = load_causal_lm(g1 / "train_stage2" / "model")

    # stage 1 lowers new-language loss; everything but round-1 experts and routers stays bit-identical
    assert eval_loss(g1 / "train_stage1" / "model", train_setup, "el") < eval_loss(g1 / "upcycle" / "model", train_setup, "el") - 0.05
    before, after = dict(parameter_roles(upcycled)), dict(parameter_roles(stage1))
    for role in ("original", "classifiers"):
        for (name, p0), (_, p1) in zip(before[role], after[role]):
            assert torch.equal(p0, p1), name
    assert any(not torch.equal(p0, p1) for (_, p0), (_, p1) in zip(before["experts_round1"], after["experts_round1"]))

    # stage 2 trains routers + classifiers only
    s1_roles, s2_roles = dict(parameter_roles(stage1)), dict(parameter_roles(stage2))
    for role in ("original", "experts_round1"):
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(s1_roles[role], s2_roles[role]))
    stats2 = json.loads((g1 / "train_stage2" / "routing_stats.json").read_text())
    share = lambda s: sum(v["original_top1_expert0"] for v in s["layers"].values()) / len(s["layers"])
    accuracy = lambda s: sum(v["classifier_accuracy"] for v in s["layers"].values() if v["classifier_accuracy"] is not None) / 2
    # stage 2 raises the expert-0 share of original-language tokens and the classifier accuracy
    assert share(stats2[-1]) > share(stats2[0]) or share(stats2[-1]) > 0.95
    assert accuracy(stats2[-1]) > accuracy(stats2[0]) and accuracy(stats2[-1]) > 0.8
    assert "stage 1 step 30/30" in proc.stderr and "tok/s" in proc.stderr and "ETA" in proc.stderr
    manifest = json.loads((g1 / "train_stage2" / "manifest.json").read_text())
    assert manifest["summary"]["steps"] == 40

    # the whole run is up to date now
    again = run_cli(["run", str(config)])
    assert again.returncode == 0 and again.stderr.count("up to date") == 6

    # the report: perplexity of every model on every language, forgetting, routing, figures
    report = json.loads((g1 / "evaluate" / "report.json").read_text())
    assert list(report["perplexity"]) == ["base", "g1/stage1", "g1"]
    assert report["perplexity"]["g1"]["el"] < report["perplexity"]["base"]["el"]
    assert set(report["forgetting_percent"]["g1"]) == {"en"}
    assert set(report["routing"]["g1"]) == {"en", "el", "hu"}
    assert report["experts"]["g1"]["new_experts"] == 3
    assert report["parameters"]["g1"] > report["parameters"]["base"]
    md = (g1 / "evaluate" / "report.md").read_text()
    assert "| g1 |" in md and "perplexity.png" in md
    assert (g1 / "evaluate" / "routing_g1.png").stat().st_size > 1000
    assert "Report:" in proc.stdout and "new experts in total" in proc.stdout
    compare = run_cli(["compare", str(run_dir)])
    assert compare.returncode == 0 and "| run | g1 | g1 | 3 |" in compare.stdout


def state(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_resume_after_a_killed_run_gives_the_same_weights(train_setup, tmp_path):
    common = dict(stage1=dict(steps=160, block_length=96, micro_batch_size=8), checkpoint_every=40)
    reference = write_config(train_setup, tmp_path / "ref", **common)
    prepare(reference)
    assert run_cli(["train", str(reference), "--stage", "1"]).returncode == 0

    killed = write_config(train_setup, tmp_path / "killed", **common)
    prepare(killed)
    env = clean_env()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "train", str(killed), "--stage", "1"], cwd=ROOT,
                            env=env, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "checkpoint step40 saved" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    stage_dir = tmp_path / "killed" / "g1" / "train_stage1"
    assert not stage_dir.exists()  # nothing half-written
    resumed = run_cli(["train", str(killed), "--stage", "1"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "at step 40" in resumed.stderr
    a, b = state(tmp_path / "ref" / "g1" / "train_stage1" / "model"), state(stage_dir / "model")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def torchrun(config: Path, stage: int, *overrides: str) -> subprocess.CompletedProcess:
    """``stages/train.py`` on 2 gloo ranks under torchrun."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(free_port()), "stages/train.py", "--config", str(config),
                           "--stage", str(stage), *overrides], cwd=ROOT, env=clean_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def assert_same_weights(a: Path, b: Path, exact: bool = False) -> None:
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        if exact:
            assert torch.equal(sa[key], sb[key]), key
        else:
            torch.testing.assert_close(sa[key], sb[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("ds_config, ep_size", [("ds_configs/zero1_fp32.json", 1), ("ds_configs/zero2_fp32.json", 1),
                                                ("ds_configs/zero1_fp32.json", 2), ("ds_configs/zero2_fp32.json", 2)])
def test_two_processes_match_one(train_setup, tmp_path, ds_config, ep_size):
    """2 gloo ranks = 1 process with 2 accumulation steps: data parallel (ZeRO-1 / ZeRO-2), and with ep_size=2
    also expert parallel, with uneven experts (layer 0: 2 new experts, one per rank; layer 1: 1 new expert, so
    one rank holds none of that layer)."""
    one = write_config(train_setup, tmp_path / "one", ds_config=ds_config,
                       stage1=dict(steps=6, micro_batch_size=2, gradient_accumulation=2),
                       stage2=dict(steps=4, micro_batch_size=2, gradient_accumulation=2))
    prepare(one)
    two = write_config(train_setup, tmp_path / "two", ds_config=ds_config, ep_size=ep_size,
                       stage1=dict(steps=6, micro_batch_size=2, gradient_accumulation=1),
                       stage2=dict(steps=4, micro_batch_size=2, gradient_accumulation=1))
    prepare(two)
    stages = (1, 2) if ep_size > 1 else (1,)  # stage 2 under expert parallelism: experts frozen but sharded
    for stage in stages:
        proc = run_cli(["train", str(one), "--stage", str(stage)])
        assert proc.returncode == 0, proc.stderr[-3000:]
        proc = torchrun(two, stage)
        assert f"ep_size {ep_size}" in proc.stderr
        a, b = (root / "g1" / f"train_stage{stage}" / "model" for root in (tmp_path / "one", tmp_path / "two"))
        assert_same_weights(a, b)
        before = state(tmp_path / "one" / "g1" / ("upcycle" if stage == 1 else "train_stage1") / "model")
        assert any(not torch.equal(before[k], v) for k, v in state(a).items())
        loss = [json.loads((root / "g1" / f"train_stage{stage}" / "manifest.json").read_text())["summary"]["final_loss"]
                for root in (tmp_path / "one", tmp_path / "two")]
        assert loss[0] == pytest.approx(loss[1], rel=1e-5)  # the last step's loss over the whole batch


def step_losses(stderr: str, training_stage: int) -> list[float]:
    """The total loss of every step, from a training stage's log."""
    return [float(x) for x in re.findall(rf"stage {training_stage} step \d+/\d+ \| loss ([0-9.]+)", stderr)]


def test_bf16_zero1_and_zero2_train_close_to_fp32(train_setup, tmp_path):
    """A few stage-1 and stage-2 steps in bf16 (ZeRO-1: DeepSpeed's BF16_Optimizer; ZeRO-2: its ZeRO optimizer,
    both with fp32 master weights) against fp32 from the same upcycled model. Tolerance 2% per step: bf16 keeps 8
    significant bits (relative rounding 2^-9), and the whole model, frozen weights and activations included, runs
    in bf16 (only the router, the norms and the loss compute in fp32); the measured gap is a few tenths of a percent."""
    steps = dict(stage1=dict(steps=4, warmup_steps=1), stage2=dict(steps=3, warmup_steps=1))
    prepared = write_config(train_setup, tmp_path / "prepared", **steps)
    prepare(prepared)
    losses = {}
    for ds_config in ("zero1_fp32", "zero1_bf16", "zero2_bf16"):
        run_dir = tmp_path / ds_config
        shutil.copytree(tmp_path / "prepared", run_dir)
        config = write_config(train_setup, run_dir, ds_config=f"ds_configs/{ds_config}.json", **steps)
        for stage in (1, 2):
            proc = run_cli(["train", str(config), "--stage", str(stage)])
            assert proc.returncode == 0, proc.stderr[-3000:]
            losses[ds_config, stage] = step_losses(proc.stderr, stage)
        exported = state(run_dir / "g1" / "train_stage2" / "model")
        assert {t.dtype for t in exported.values()} == {torch.bfloat16 if "bf16" in ds_config else torch.float32}
    for ds_config in ("zero1_bf16", "zero2_bf16"):
        for stage, count in ((1, 4), (2, 3)):
            reference, got = losses["zero1_fp32", stage], losses[ds_config, stage]
            assert len(got) == len(reference) == count
            assert got == pytest.approx(reference, rel=0.02), (ds_config, stage, got, reference)
            assert got != reference  # it really ran in another precision


@pytest.mark.parametrize("ds_config", ["ds_configs/cpu_fp32.json", "ds_configs/zero2_fp32.json"])
def test_expert_parallel_checkpoints_resume_and_load_into_one_process(train_setup, tmp_path, ds_config):
    config = write_config(train_setup, tmp_path / "ep", ds_config=ds_config, ep_size=2,
                          checkpoint_every=3, stage1=dict(steps=6, micro_batch_size=2))
    prepare(config)
    torchrun(config, 1)
    g1 = tmp_path / "ep" / "g1"
    checkpoints, exported = g1 / "train_stage1.checkpoints", g1 / "train_stage1"
    shutil.copytree(exported / "model", tmp_path / "uninterrupted")
    for tag in ("step3", "step6"):
        assert {f.name for f in (checkpoints / tag).glob("experts_ep*")} == {"experts_ep0.safetensors",
                                                                              "experts_ep1.safetensors"}
    # interrupted after step 3: resuming with the same layout continues exactly
    shutil.rmtree(checkpoints / "step6")
    (checkpoints / "latest").write_text("step3")
    shutil.rmtree(exported)
    proc = torchrun(config, 1)
    assert "at step 3" in proc.stderr
    assert_same_weights(tmp_path / "uninterrupted", exported / "model", exact=True)
    # the ep_size=2 checkpoint of step 6 in one process with ep_size=1: the same weights
    shutil.rmtree(exported)
    proc = run_cli(["train", str(config), "--stage", "1", "train.ep_size=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "with another layout" in proc.stderr and "at step 6" in proc.stderr
    assert_same_weights(tmp_path / "uninterrupted", exported / "model", exact=True)


def test_ep_size_must_divide_the_number_of_processes(train_setup, tmp_path):
    config = write_config(train_setup, tmp_path / "bad", ep_size=2)
    prepare(config)
    proc = run_cli(["train", str(config), "--stage", "1"])
    assert proc.returncode == 2 and "train.ep_size=2 does not divide the number of processes (1)" in proc.stderr


def test_nan_loss_stops_with_a_clear_message(train_setup, tmp_path):
    config = write_config(train_setup, tmp_path / "nan", stage1=dict(steps=5, lr=1e30, warmup_steps=0), checkpoint_every=1)
    prepare(config)
    proc = run_cli(["train", str(config), "--stage", "1"])
    assert proc.returncode == 2
    assert "non-finite loss at step" in proc.stderr and "last good checkpoint" in proc.stderr
    assert not (tmp_path / "nan" / "g1" / "train_stage1").exists()


def test_a_corrupt_checkpoint_is_a_clear_error(train_setup, tmp_path):
    config = write_config(train_setup, tmp_path / "corrupt", stage1=dict(steps=2))
    prepare(config)
    assert run_cli(["train", str(config), "--stage", "1"]).returncode == 0
    stage_dir = tmp_path / "corrupt" / "g1" / "train_stage1"
    shutil.rmtree(stage_dir)
    states = tmp_path / "corrupt" / "g1" / "train_stage1.checkpoints" / "step2" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])
    proc = run_cli(["train", str(config), "--stage", "1"])
    assert proc.returncode == 2 and "cannot read checkpoint" in proc.stderr and "corrupt?" in proc.stderr
    assert "Traceback" not in proc.stderr and not stage_dir.exists()
