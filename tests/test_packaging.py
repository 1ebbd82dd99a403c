"""The installed package carries its demos: the build (setup.py's build_py) copies the demo
digits, the demo tokenizer and the recipes into paddle_cae/_bundled/, and the commands run from
an empty folder against that copy alone; --config finds recipes by name."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from paddle_cae import resources

ROOT = Path(__file__).resolve().parent.parent


def test_config_names_resolve_to_the_recipe_of_the_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: everything comes from the recipe folder
    configs = ROOT / "configs"
    assert resources.find_config("mae_vit_base_patch16_800e", "pretrain", configs) == \
        str(configs / "pretrain" / "mae_vit_base_patch16_800e.yaml")
    # the same name in finetune/ and linprobe/: the command's phase decides
    assert resources.find_config("mae_vit_base_patch16", "finetune", configs) == \
        str(configs / "finetune" / "mae_vit_base_patch16.yaml")
    assert resources.find_config("mae_vit_base_patch16.yaml", "linprobe", configs) == \
        str(configs / "linprobe" / "mae_vit_base_patch16.yaml")
    assert resources.find_config("mae", "pretrain", configs) == str(configs / "demo" / "mae.yaml")
    assert resources.find_config("mae", "finetune", configs) == str(configs / "demo" / "finetune_mae.yaml")
    assert resources.find_config("demo/cae", "pretrain", configs) == str(configs / "demo" / "cae.yaml")
    assert resources.find_config("no_such_recipe", "pretrain", configs) == "no_such_recipe"
    local = tmp_path / "mae.yaml"  # a file of the user's own wins over a packaged name
    local.write_text("epochs: 1\n")
    assert resources.find_config("mae.yaml", "pretrain", configs) == "mae.yaml"
    argv = resources.with_config_found(["--config", "mae_vit_base_patch16_800e", "--epochs", "2"], "pretrain")
    assert argv[1] == str(ROOT / "configs" / "pretrain" / "mae_vit_base_patch16_800e.yaml")


def test_the_demo_data_outside_a_checkout_is_the_bundled_copy_or_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(resources, "REPO", tmp_path / "site-packages")
    monkeypatch.setattr(resources, "BUNDLED", tmp_path / "site-packages" / "paddle_cae" / "_bundled")
    with pytest.raises(resources.MissingResourceError, match="give --data_path"):
        resources.demo_data_path()
    digits = resources.BUNDLED / "demo" / "digits"
    digits.mkdir(parents=True)
    assert resources.demo_data_path() == str(digits)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The package as a wheel would install it: setup.py's build_py output."""
    out = tmp_path_factory.mktemp("build")
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "-d", str(out)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.mark.slow
def test_the_build_bundles_the_demo_data_and_every_recipe(built):
    bundled = built / "paddle_cae" / "_bundled"
    for folder in ("demo/digits", "demo/tokenizer", "configs"):
        ours = sorted(p.relative_to(ROOT / folder) for p in (ROOT / folder).rglob("*") if p.is_file())
        theirs = sorted(p.relative_to(bundled / folder) for p in (bundled / folder).rglob("*") if p.is_file())
        assert ours and theirs == ours, folder


@pytest.mark.slow
def test_installed_commands_run_the_demos_from_an_empty_folder(built, tmp_path):
    """The built package alone on PYTHONPATH (no checkout next to it), run from an empty folder:
    the pretraining demo, a fine-tune of its checkpoint, and a recipe found by name."""
    empty = tmp_path / "anywhere"
    empty.mkdir()
    env = dict(os.environ, PYTHONPATH=str(built), OMP_NUM_THREADS="1")

    def command(name, *argv):
        code = f"import sys; from paddle_cae.cli import {name}; sys.argv[1:] = {list(argv)!r}; sys.exit({name}())"
        return subprocess.run([sys.executable, "-c", code], cwd=empty, env=env, capture_output=True, text=True)

    proc = command("pretrain_command", "--epochs", "1", "--max_train_step", "2", "--num_workers", "0",
                   "--output_dir", "pre")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(built / "paddle_cae" / "_bundled" / "demo" / "digits") in proc.stdout + proc.stderr
    checkpoint = empty / "pre" / "checkpoint-0.pd"
    assert checkpoint.is_file()
    proc = command("finetune_command", "--finetune", str(checkpoint), "--epochs", "1", "--max_train_step", "2",
                   "--num_workers", "0", "--output_dir", "ft")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (empty / "ft" / "checkpoint-best.pd").is_file()
    proc = command("pretrain_command", "--config", "bootmae", "--epochs", "1", "--max_train_step", "1",
                   "--num_workers", "0", "--output_dir", "by_name")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (empty / "by_name" / "checkpoint-0.pd").is_file()
    proc = command("pretrain_command", "--config", "no_such_recipe", "--epochs", "1")
    assert proc.returncode != 0 and "no_such_recipe" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="not a git checkout")
def test_run_outputs_and_exports_are_ignored_by_git():
    paths = ["output/demo_mae/checkpoint-2.pd", "exported/inference.pdiparams", "build/lib/x.py"]
    proc = subprocess.run(["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True)
    assert proc.stdout.split() == paths
