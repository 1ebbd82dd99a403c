"""Data-parallel training under loss scaling: two gloo ranks launched with
``paddle.distributed.launch``; a non-finite loss on one rank only must neither deadlock the
job nor let the ranks drift apart (they skip the step together and keep one loss scale)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKER = str(ROOT / "tests" / "workers" / "dp_overflow.py")


def launch(tmp_path, *worker_args, timeout=1800, worker=WORKER, env_extra=None):  # a hang guard (a dead rank), not a speed limit
    """Two gloo ranks of ``worker``: (launcher process, the RESULT lines by rank, the logs)."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **(env_extra or {}))
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
           "--log_dir", str(logs), worker, *worker_args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)
    text = "".join(p.read_text() for p in sorted(logs.glob("workerlog.*")))
    results = [json.loads(line.split("RESULT ", 1)[1]) for line in text.splitlines()
               if line.startswith("RESULT ")]
    return proc, sorted(results, key=lambda r: r["rank"]), text


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_one_rank_overflowing_skips_the_step_on_every_rank(tmp_path, accum):
    proc, results, logs = launch(tmp_path, "--accum", str(accum))
    assert proc.returncode == 0 and len(results) == 2, logs[-3000:]
    r0, r1 = results
    # the group holding step 1 is skipped on both ranks, every other group steps
    assert r0["steps"] == r1["steps"], logs[-3000:]
    skipped_groups = [i // accum for i, (_, skipped, _) in enumerate(r0["steps"]) if skipped]
    assert skipped_groups == [1 // accum]
    assert sum(stepped for stepped, _, _ in r0["steps"]) == 6 // accum - 1
    assert r0["scale"] == r1["scale"] == 65536.0 / 2 and r0["skipped"] == r1["skipped"] == 1
    assert r0["in_sync"] is True and r1["in_sync"] is True


@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_without_scaling_stops_every_rank(tmp_path):
    proc, results, logs = launch(tmp_path, "--scaling", "0")
    assert len(results) == 2, logs[-3000:]
    errors = {r["rank"]: r["error"] for r in results}
    assert "loss is" in errors[1] and "another rank" in errors[0]
    assert all(len(r["steps"]) == 1 for r in results)


# ----------------------------------------------------------- every parameter gets a gradient
PRETRAIN_CASES = {
    "mae": ["--config", "configs/demo/mae.yaml"],
    "cae": ["--config", "configs/demo/cae.yaml"],
    "bootmae": ["--config", "configs/demo/bootmae.yaml"],  # teacher, feature loss on
    "bootmae_fw0": ["--config", "configs/demo/bootmae.yaml", "--feature_weight", "0"],
    "bootmae_no_teacher": ["--config", "configs/demo/bootmae.yaml", "--feature_weight", "0",
                           "--model_ema", "false"],
}


def _missing_gradients(model):
    return [n for n, p in model.named_parameters() if not p.stop_gradient and p.grad is None]


@pytest.mark.parametrize("case", sorted(PRETRAIN_CASES))
def test_every_trainable_pretraining_parameter_gets_a_gradient_or_is_declared(case, monkeypatch):
    import paddle

    from paddle_cae.data.datasets import build_dataset
    from paddle_cae.data.loader import collate_samples
    from paddle_cae.engine.pretrain import training_inputs
    from paddle_cae.methods import get_method
    from paddle_cae.cli.pretrain import build_model, prepare_args
    from paddle_cae.runtime import distributed as dist_rt
    from paddle_cae.cli.pretrain_args import parse_pretrain_args

    monkeypatch.chdir(ROOT)
    args = parse_pretrain_args(PRETRAIN_CASES[case])
    prepare_args(args, dist_rt.DistEnv())
    method = get_method(args.method)
    prepared = method.prepare_run(args)
    paddle.seed(0)
    model = build_model(args)
    method.attach(model, prepared)
    dataset = build_dataset("train", args.data_path, method.pretrain_transform(args))
    samples = collate_samples([dataset[i] for i in range(4)])
    batch = {k: paddle.to_tensor(v) for k, v in samples.items()}
    model.train()
    model(training_inputs(method, model, batch, 1, dataset.conversions))["loss"].backward()
    missing = _missing_gradients(model)
    declared = dist_rt.unused_parameter_names(model)
    # what data_parallel is told may go unused is exactly what got no gradient
    assert sorted(missing) == sorted(declared)
    assert bool(declared) == case.endswith(("fw0", "no_teacher"))


CLASSIFIER_CASES = {
    "finetune_mae": ("finetune", "configs/demo/finetune_mae.yaml", []),
    "finetune_cae": ("finetune", "configs/demo/finetune_cae.yaml", []),
    "finetune_bootmae": ("finetune", "configs/demo/finetune_bootmae.yaml", []),
    "finetune_vit_cls_token": ("finetune", "configs/demo/finetune_mae.yaml",
                               ["--global_pool", "false"]),
    "linprobe_mae": ("linprobe", "configs/demo/linprobe_mae.yaml", []),
    "linprobe_cae_attentive": ("linprobe", "configs/demo/linprobe_cae.yaml", []),
    "linprobe_cae_standard": ("linprobe", "configs/demo/linprobe_cae.yaml",
                              ["--linear_type", "standard"]),
}


@pytest.mark.parametrize("case", sorted(CLASSIFIER_CASES))
def test_every_trainable_classifier_parameter_gets_a_gradient(case, monkeypatch):
    import paddle

    from paddle_cae.loading.classifier import build_classifier, classifier_config
    from paddle_cae.cli.classify import freeze_for_probe, probe_train_mode
    from paddle_cae.runtime import distributed as dist_rt
    from paddle_cae.cli.finetune_args import parse_finetune_args, parse_linprobe_args

    monkeypatch.chdir(ROOT)
    phase, config, extra = CLASSIFIER_CASES[case]
    parse = parse_finetune_args if phase == "finetune" else parse_linprobe_args
    args = parse(["--config", config] + extra)
    paddle.seed(0)
    model = build_classifier(classifier_config(args, 10))
    if phase == "linprobe":
        assert freeze_for_probe(model)
        probe_train_mode(model)
    else:
        model.train()
    size = int(args.input_size)
    logits = model(paddle.randn([2, 3, size, size]))
    logits = logits[0] if isinstance(logits, (tuple, list)) else logits
    logits.sum().backward()
    assert _missing_gradients(model) == []
    assert dist_rt.unused_parameter_names(model) == []


LAUNCH_CASES = {
    "mae": ("main_pretrain.py", ["--config", "configs/demo/mae.yaml"]),
    "cae": ("main_pretrain.py", ["--config", "configs/demo/cae.yaml"]),
    # the default recipe setting that leaves the feature decoder without gradient
    "bootmae_fw0": ("main_pretrain.py", ["--config", "configs/demo/bootmae.yaml",
                                         "--feature_weight", "0", "--model_ema", "false"]),
    "bootmae": ("main_pretrain.py", ["--config", "configs/demo/bootmae.yaml"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(LAUNCH_CASES))
def test_two_processes_train_each_pretraining_method(tmp_path, case):
    main, config = LAUNCH_CASES[case]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out, logs = tmp_path / "out", tmp_path / "logs"
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
           "--log_dir", str(logs), str(ROOT / main)] + [
        a if not a.startswith("configs/") else str(ROOT / a) for a in config] + [
        "--epochs", "1", "--max_train_step", "2", "--batch_size", "4", "--num_workers", "0",
        "--warmup_epochs", "0", "--print_freq", "50", "--auto_resume", "false",
        "--output_dir", str(out)]
    try:  # a healthy launch takes ~10 s; a rank that died can leave the other one waiting
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=1800)
    except subprocess.TimeoutExpired:
        text = "".join(p.read_text() for p in sorted(logs.glob("workerlog.*")))
        pytest.fail(f"{case}: the two-process launch did not finish in 1800 s:\n{text[-3000:]}")
    text = "".join(p.read_text() for p in sorted(logs.glob("workerlog.*")))
    assert proc.returncode == 0, text[-3000:]
    record = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert record["ranks_in_sync"] is True
