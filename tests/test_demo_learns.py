"""The README's demo chain visibly learns: the MAE demo pretraining, then the demo fine-tune
and the demo linear probe of its checkpoint with the demo configs as shipped (no flag but the
folders), then the README's example image (the first "3" of the validation digits) through
main_infer.py and through the exported model with examples/predict_exported.py.

Thresholds (issue: fine-tune >= 85%, probe well above the 10% of chance, >= 50%, the example
predicted right) are well below what the shipped configs reach (configs/demo/*.yaml,
"# expect:" lines), so that a change of numerics does not fail them, while a chain that stops
learning does (5 fine-tune epochs gave 39%, the LARS probe 13%)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VAL3 = ROOT / "demo" / "digits" / "val" / "3"
README_IMAGE = VAL3 / sorted(os.listdir(VAL3))[0]  # README: $(ls demo/digits/val/3 | head -1)


def script(name, *argv, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / name), *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc


def last_top1(output_dir):
    records = [json.loads(line) for line in (output_dir / "log.txt").read_text().splitlines() if line.strip()]
    return float([r for r in records if "test_acc1" in r][-1]["test_acc1"])


@pytest.mark.slow
def test_the_readme_demo_chain_learns(tmp_path):
    pre, ft, lp, exported = (tmp_path / name for name in ("demo_mae", "ft", "lp", "exported"))
    shown = script("main_pretrain.py", "--output_dir", pre, cwd=tmp_path)
    assert "what to expect:" in shown.stdout + shown.stderr
    checkpoint = pre / "checkpoint-2.pd"  # the README's file name: 3 demo epochs
    assert checkpoint.is_file()
    losses = [json.loads(line)["train_loss"] for line in (pre / "log.txt").read_text().splitlines()]
    assert losses[-1] < 0.8 * losses[0]

    shown = script("main_finetune.py", "--finetune", checkpoint, "--output_dir", ft, cwd=tmp_path)
    assert "what to expect:" in shown.stdout + shown.stderr
    finetune_top1 = last_top1(ft)
    assert finetune_top1 >= 85.0, finetune_top1

    script("main_linprobe.py", "--finetune", checkpoint, "--output_dir", lp, cwd=tmp_path)
    probe_top1 = last_top1(lp)
    assert probe_top1 >= 50.0, probe_top1

    best = ft / "checkpoint-best.pd"
    out = script("main_infer.py", "--resume", best, "--img_path", README_IMAGE, "--json", "--device", "cpu",
                 cwd=tmp_path).stdout
    predicted = json.loads(out)[0]["predictions"][0]
    assert predicted["class_name"] == "3", predicted
    script("main_infer.py", "--resume", best, "--export", exported, cwd=tmp_path)
    out = script("examples/predict_exported.py", exported, README_IMAGE, "--json", "--device", "cpu",
                 cwd=tmp_path).stdout
    assert json.loads(out)[0]["predictions"][0]["class_name"] == "3"


@pytest.mark.slow
@pytest.mark.parametrize("method, pretrain_model, finetune_model", [
    ("cae", "cae_base_patch16_224_8k_vocab", "cae_base_patch16_224"),
    ("bootmae", "bootmae_base", "bootmae_base_patch16_224"),
])
def test_the_cae_and_bootmae_demo_chains_learn(tmp_path, method, pretrain_model, finetune_model):
    """README: `--model cae_base_patch16_224_8k_vocab` / `--model bootmae_base` pretrain the other
    methods' demos (configs/demo/{cae,bootmae}.yaml), then their demo fine-tunes
    (configs/demo/finetune_{cae,bootmae}.yaml) reach the same >= 85% as MAE's. Measured (last
    epoch, 1 thread): CAE 89.1% (seed 0), 87.7% (pretraining and fine-tune seed 1); BootMAE 91.4%,
    91.4%. At 32 px, before the demo fine-tunes moved to 36 px, they ended at 68% and 73%."""
    pre, ft = tmp_path / f"demo_{method}", tmp_path / "ft"
    script("main_pretrain.py", "--model", pretrain_model, "--output_dir", pre, cwd=tmp_path)
    checkpoint = pre / "checkpoint-2.pd"
    assert checkpoint.is_file()
    script("main_finetune.py", "--model", finetune_model, "--finetune", checkpoint, "--output_dir", ft,
           cwd=tmp_path)
    finetune_top1 = last_top1(ft)
    assert finetune_top1 >= 85.0, finetune_top1
