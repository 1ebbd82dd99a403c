"""Smoke test of benchmarks/learning.py: the --quick run (1 epoch of a few batches per stage)
finishes and prints a table row per method with numbers in [0, 100]. Not a quality check."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_learning_benchmark_prints_a_row_per_method(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "learning.py"), "--quick",
                             "--output_dir", str(tmp_path)], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    header, body = rows[0], rows[1:]
    assert "linear probe top-1" in header and "random init" in header and "recipe fine-tune, own init" in header
    labels = [row.split("|")[1].strip() for row in body]
    assert len(body) == 3
    assert labels[0].startswith("CAE (demo tokenizer: fixed random weights")
    assert labels[1:] == ["MAE", "BootMAE"]
    for row in body:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        for top1 in cells[3:8]:
            assert 0.0 <= float(top1) <= 100.0
        assert re.fullmatch(r"[0-9.]+ -> [0-9.]+", cells[2])


@pytest.mark.slow
def test_own_init_baseline_runs_the_recipe_without_finetune_weights(tmp_path):
    """--own_init_only: no pretraining; each method's official fine-tune recipe file from the
    classifier's own initialisation, at the benchmark's size."""
    import sys as _sys

    _sys.path.insert(0, str(ROOT / "benchmarks"))
    import learning

    from paddle_cae.cli.finetune_args import parse_finetune_args

    for method, model, layer_decay in (("mae", "vit_base_patch16", 0.65), ("cae", "cae_base_patch16_224", 0.65),
                                       ("bootmae", "bootmae_base_patch16_224", 0.6)):
        model_argv = learning.classifier_args(method, learning.pretrain_args(method, learning.FULL, None))
        argv = learning.own_init_finetune_argv(method, str(tmp_path / method), model_argv, learning.FULL)
        assert "--finetune" not in argv
        args = parse_finetune_args(argv)
        assert args.model == model and args.layer_decay == layer_decay and args.input_size == 32
        assert args.aa == "rand-m9-mstd0.5-inc1" and args.mixup == 0.8 and args.cutmix == 1.0
        assert args.epochs == learning.FULL["own_init_epochs"] and args.lr == float(learning.OWN_INIT_LR)
        assert args.model_args["patch_size"] == 8 and args.nb_classes == 10

    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "learning.py"), "--quick", "--own_init_only",
                             "--methods", "bootmae", "--output_dir", str(tmp_path)], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert "recipe fine-tune, own init" in rows[0] and rows[1].startswith("| BootMAE |")
    assert 0.0 <= float(rows[1].split("|")[2]) <= 100.0
    assert not (tmp_path / "bootmae" / "pretrain").exists()
