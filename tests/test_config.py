"""YAML configs + command-line overrides, the pretraining argument table, the seed command lines."""
import glob
import os
import shlex

import pytest

from paddle_cae.runtime.config import Arg, ConfigError, load_config, parse_args, to_yaml
from paddle_cae.cli.pretrain_args import (absolute_lr, apply_method_defaults, parse_pretrain_args,
                                              pretrain_table)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# pretraining configs: the recipes and the demo files of the pretraining methods (the
# fine-tune and linear-probe configs are checked against their own tables in their tests)
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "pretrain", "*.yaml")) +
                 [p for p in glob.glob(os.path.join(ROOT, "configs", "demo", "*.yaml"))
                  if not os.path.basename(p).startswith(("finetune_", "linprobe_"))])
SEED_FILE = os.path.join(ROOT, "tests", "data", "seed_pretrain_commands.txt")
SHELL_VARS = {"MODEL": "bootmae_base", "DATA_PATH": "/data/imagenet", "OUTPUT_DIR": "./out",
              "TOKENIZER_PATH": "./tokenizer-weights", "IMAGENET_DIR": "/data/imagenet", "my_name": "run"}

SMALL_TABLE = (
    Arg("epochs", "int", 10, minimum=1),
    Arg("blr", "float", 1e-3, minimum=0.0, open_min=True),
    Arg("norm_pix_loss", "bool", False),
    Arg("auto_resume", "bool", True, negative=("no_auto_resume",)),
    Arg("model", "str", "m"),
    Arg("model_args", "dict", {}),
    Arg("opt_betas", "floats", None),
    Arg("align_loss_weight", "float", 2.0, aliases=("dual_loss_weight",)),
)


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _seed_commands():
    with open(SEED_FILE) as f:
        lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    return lines


def _expand(command):
    for name, value in SHELL_VARS.items():
        command = command.replace("${%s}" % name, value).replace("$" + name, value)
    return shlex.split(command)


# ----------------------------------------------------------------------- generic config
def test_command_line_overrides_the_file_which_overrides_the_defaults(tmp_path):
    cfg = _write(tmp_path, "a.yaml", "epochs: 5\nblr: 1.5e-4\nmodel: from_file\n")
    args = parse_args(["--config", cfg, "--epochs", "7"], SMALL_TABLE)
    assert args.epochs == 7 and args.blr == pytest.approx(1.5e-4) and args.model == "from_file"
    assert args.norm_pix_loss is False and args.config == cfg


def test_base_file_is_extended_and_overridden(tmp_path):
    _write(tmp_path, "base.yaml", "epochs: 5\nmodel: base_model\n")
    child = _write(tmp_path, "child.yaml", "_base_: base.yaml\nepochs: 9\n")
    args = parse_args(["-c", child], SMALL_TABLE)
    assert (args.epochs, args.model) == (9, "base_model")


def test_unknown_key_in_a_file_names_the_key_and_the_file(tmp_path):
    cfg = _write(tmp_path, "bad.yaml", "epochs: 5\nepoch: 3\n")
    with pytest.raises(ConfigError) as err:
        parse_args(["--config", cfg], SMALL_TABLE)
    assert "'epoch'" in str(err.value) and "bad.yaml" in str(err.value) and "epochs" in str(err.value)


def test_unknown_flag_on_the_command_line_is_an_error_with_a_suggestion():
    with pytest.raises(ConfigError, match="--norm_pixloss.*norm_pix_loss"):
        parse_args(["--norm_pixloss"], SMALL_TABLE)


@pytest.mark.parametrize("text, message", [
    ("epochs: -3\n", "'epochs' must be an integer >= 1, got -3"),
    ("epochs: 2.5\n", "'epochs' must be an integer"),
    ("blr: fast\n", "'blr' must be a number > 0.0"),
    ("norm_pix_loss: maybe\n", "'norm_pix_loss' must be true or false"),
    ("model_args: [1, 2]\n", "'model_args' must be a mapping"),
])
def test_bad_values_in_a_file_name_the_key_and_what_was_expected(tmp_path, text, message):
    cfg = _write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError) as err:
        parse_args(["--config", cfg], SMALL_TABLE)
    assert message in str(err.value) and "bad.yaml" in str(err.value)


def test_bad_value_on_the_command_line_names_the_flag():
    with pytest.raises(ConfigError, match="--epochs.*'epochs' must be an integer >= 1, got -1"):
        parse_args(["--epochs", "-1"], SMALL_TABLE)


def test_store_true_flags_keep_official_meaning_and_accept_a_value():
    assert parse_args(["--norm_pix_loss"], SMALL_TABLE).norm_pix_loss is True
    assert parse_args(["--norm_pix_loss", "false"], SMALL_TABLE).norm_pix_loss is False
    assert parse_args(["--norm_pix_loss", "--epochs", "3"], SMALL_TABLE).epochs == 3
    assert parse_args(["--no_auto_resume"], SMALL_TABLE).auto_resume is False
    assert parse_args(["--auto_resume", "no"], SMALL_TABLE).auto_resume is False


def test_store_false_companion_works_in_a_file(tmp_path):
    cfg = _write(tmp_path, "a.yaml", "no_auto_resume: true\n")
    assert parse_args(["--config", cfg], SMALL_TABLE).auto_resume is False


def test_model_args_accept_json_and_inline_yaml():
    args = parse_args(["--model_args", '{"embed_dim": 64, "depth": 2}'], SMALL_TABLE)
    assert args.model_args == {"embed_dim": 64, "depth": 2}
    assert parse_args(["--model_args", "{embed_dim: 32}"], SMALL_TABLE).model_args == {"embed_dim": 32}


def test_aliases_write_to_the_official_key(tmp_path):
    assert parse_args(["--dual_loss_weight", "3"], SMALL_TABLE).align_loss_weight == 3.0
    cfg = _write(tmp_path, "a.yaml", "dual_loss_weight: 4\n")
    assert load_config(cfg, SMALL_TABLE) == {"align_loss_weight": 4.0}


def test_float_lists_from_flags_and_files(tmp_path):
    assert parse_args(["--opt_betas", "0.9", "0.95"], SMALL_TABLE).opt_betas == [0.9, 0.95]
    cfg = _write(tmp_path, "a.yaml", "opt_betas: [0.9, 0.999]\n")
    assert parse_args(["-c", cfg], SMALL_TABLE).opt_betas == [0.9, 0.999]


def test_missing_config_file_is_reported():
    with pytest.raises(ConfigError, match="not found"):
        parse_args(["--config", "no/such/file.yaml"], SMALL_TABLE)


def test_resolved_values_round_trip_through_yaml(tmp_path):
    args = parse_args(["--epochs", "4", "--model_args", "{depth: 2}"], SMALL_TABLE)
    cfg = _write(tmp_path, "dump.yaml", to_yaml(args, SMALL_TABLE))
    again = parse_args(["-c", cfg], SMALL_TABLE)
    same = {"config": None, "given_keys": None}  # the dump gives every key
    assert vars(again) | same == vars(args) | same


# ------------------------------------------------------------------ pretraining table
def test_every_seed_pretraining_command_parses():
    commands = _seed_commands()
    assert len(commands) == 4
    for command in commands:
        args = parse_pretrain_args(_expand(command))
        assert args.method in ("mae", "cae", "bootmae")


def test_seed_commands_keep_each_repository_meaning():
    paddle_cae, official_cae, paddle_mae, bootmae = (parse_pretrain_args(_expand(c)) for c in _seed_commands())
    assert paddle_cae.align_loss_weight == 2.0 and paddle_cae.decoder_depth == 4
    assert paddle_cae.num_mask_patches == 75 and paddle_cae.sincos_pos_emb and paddle_cae.dual_path_ema == 0.0
    assert paddle_cae.auto_resume is False and paddle_cae.imagenet_default_mean_and_std is True
    assert official_cae.drop_path == 0.1 and official_cae.min_lr == 1e-5 and official_cae.crop_min_size == 0.08
    assert absolute_lr(official_cae, world_size=32) == 1.5e-3  # absolute
    assert paddle_mae.norm_pix_loss and paddle_mae.accum_iter == 2 and paddle_mae.opt_betas == [0.9, 0.95]
    assert absolute_lr(paddle_mae, world_size=8) == pytest.approx(1.5e-4 * 4096 / 256)
    assert bootmae.model_ema and bootmae.model_ema_dynamic and bootmae.weight_mask
    assert bootmae.num_mask_patches == 120 and bootmae.max_mask_patches_per_block == 60
    assert absolute_lr(bootmae, world_size=8) == pytest.approx(1.5e-4 * 2048 / 256)  # scaled


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.relpath(p, ROOT) for p in CONFIGS])
def test_every_config_file_loads_and_validates(path):
    args = parse_pretrain_args(["--config", path])
    assert args.config == path and args.epochs >= 1 and args.batch_size >= 1
    assert args.warmup_epochs < args.epochs


def test_demo_configs_build_their_data_pipelines():
    for name, keys in (("mae", {"images", "noise"}),
                       ("cae", {"images", "tokenizer_images", "bool_masked_pos"}),
                       ("bootmae", {"images", "bool_masked_pos", "order"})):
        args = parse_pretrain_args(["--config", f"demo/{name}"])
        assert args.input_size == 32 and args.model_args["patch_size"] == 4
        from PIL import Image
        from paddle_cae.methods import get_method
        out = get_method(args.method).pretrain_transform(args)(Image.new("RGB", (32, 32)))
        assert set(out) == keys
        if "bool_masked_pos" in out:
            assert out["bool_masked_pos"].shape == (64,) and out["bool_masked_pos"].sum() == args.num_mask_patches
        if "order" in out:  # BootMAE: a permutation with every block-masked patch after the visible ones
            order = out["order"]
            assert sorted(order) == list(range(64))
            masked = out["bool_masked_pos"][order]
            assert not masked[: 64 - args.num_mask_patches].any() and masked[64 - args.num_mask_patches:].all()


def test_recipe_values_match_the_official_scripts():
    cae = parse_pretrain_args(["--config", "pretrain/cae_large_1600e"])
    assert (cae.warmup_epochs, cae.layer_scale_init_value, cae.decoder_embed_dim, cae.fix_init_weight) == \
        (40, 1e-5, 1024, True)
    mae = parse_pretrain_args(["--config", "pretrain/mae_vit_large_patch16_1600e"])
    assert mae.batch_size * mae.accum_iter * 8 == 4096 and mae.model == "mae_vit_large_patch16"


def test_method_defaults_fill_only_unset_values():
    args = parse_pretrain_args(["--model", "cae_base_patch16_224_8k_vocab", "--epochs", "5"])
    assert args.epochs == 5 and args.min_lr == 1e-5 and args.second_input_size == 112
    args = apply_method_defaults(parse_pretrain_args(["--model", "mae_vit_base_patch16"], method_defaults=False))
    assert args.epochs == 400 and args.imagenet_default_mean_and_std is True


def test_every_table_flag_has_help_and_unique_names():
    assert all(arg.help for arg in pretrain_table().args)
    assert len(pretrain_table().alias_of) == len(set(pretrain_table().alias_of))


def test_the_parsed_arguments_record_which_keys_the_file_and_the_command_line_gave(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model: cae_base_patch16_224_8k_vocab\ndecoder_num_classes: 512\n")
    args = parse_pretrain_args(["--config", str(config), "--epochs", "3", "--no_auto_resume"])
    assert args.given_keys == ["auto_resume", "decoder_num_classes", "epochs", "model"]
    assert parse_pretrain_args([]).given_keys == []
    # a flag given with its default value still counts as given
    assert "blr" in parse_pretrain_args(["--blr", "1e-3"]).given_keys


def test_the_tokenizer_vocabulary_is_the_class_count_unless_the_run_gave_one(tmp_path):
    from types import SimpleNamespace

    from paddle_cae.loading.tokenizer import find_tokenizer_file, vocabulary_as_class_count

    tokenizer = SimpleNamespace(vocab_size=512)
    args = parse_pretrain_args(["--model", "cae_base_patch16_224_8k_vocab"])
    assert vocabulary_as_class_count(args, tokenizer, "t.pd") == 512 == args.decoder_num_classes
    args = parse_pretrain_args(["--model", "cae_base_patch16_224_8k_vocab", "--decoder_num_classes", "8192"])
    assert vocabulary_as_class_count(args, tokenizer, "t.pd") == 8192
    args = parse_pretrain_args(["--model", "cae_base_patch16_224_8k_vocab", "--model_args", "{vocab_size: 8192}"])
    assert vocabulary_as_class_count(args, tokenizer, "t.pd") == 8192
    (tmp_path / "encoder.pkl").write_bytes(b"")
    assert find_tokenizer_file(str(tmp_path)) == str(tmp_path / "encoder.pkl")
    with pytest.raises(FileNotFoundError, match="no encoder.pkl"):
        find_tokenizer_file(str(tmp_path.parent))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_tokenizer_file(str(tmp_path / "missing"))
