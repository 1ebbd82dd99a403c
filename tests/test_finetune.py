"""Fine-tuning: demo run end to end (train, evaluate, best checkpoint, evaluate-only, resume),
pretrained weights of every kind (ours and the official fixtures), distributed evaluation
counting each image once, and one-line errors."""
import atexit
import functools
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import paddle
import pytest

from paddle_cae.data.datasets import build_dataset
from paddle_cae.data.transforms import build_eval_transform
from paddle_cae.cli import classify as classify_cli, pretrain as pretrain_cli
from paddle_cae.loading.classifier import build_classifier
from paddle_cae.engine.evaluate import ShardSampler, build_eval_loader, evaluate
from paddle_cae.engine.finetune import ModelEma
from paddle_cae.loading.pretrained import load_pretrained, resample_rel_pos_table
from paddle_cae.models import create_model
from paddle_cae.runtime.checkpoint import load_checkpoint
from paddle_cae.runtime.distributed import DistEnv

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
DEMO_CLASSIFIER = {"patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 4}
FINETUNE_EPOCHS = 3


@functools.lru_cache(maxsize=None)
def demo_runs():
    """One demo MAE pretraining (1 epoch) and one fine-tuning of it, shared by the test files:
    {"pretrain": checkpoint, "finetune_dir": output folder, "best": best checkpoint}."""
    root = tempfile.mkdtemp(prefix="paddle_cae_ft_")
    atexit.register(shutil.rmtree, root, True)
    pre_dir = os.path.join(root, "pretrain")
    assert pretrain_cli.main(["--output_dir", pre_dir, "--epochs", "1", "--num_workers", "0"]) == 0
    ft_dir = os.path.join(root, "finetune")
    assert classify_cli.main(["--finetune", os.path.join(pre_dir, "checkpoint-0.pd"),
                               "--output_dir", ft_dir, "--epochs", str(FINETUNE_EPOCHS),
                               "--num_workers", "0", "--print_freq", "100"]) == 0
    return {"root": root, "pretrain": os.path.join(pre_dir, "checkpoint-0.pd"), "finetune_dir": ft_dir,
            "best": os.path.join(ft_dir, "checkpoint-best.pd")}


class captured_log:
    """Collects the package's log messages (its logger does not propagate to pytest's)."""

    def __enter__(self):
        self.lines = []
        self.handler = logging.Handler()
        self.handler.emit = lambda record: self.lines.append(record.getMessage())
        logging.getLogger("paddle_cae").addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        logging.getLogger("paddle_cae").removeHandler(self.handler)
        return False

    @property
    def text(self):
        return "\n".join(self.lines)


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def one_line_error(text):
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    assert "Traceback" not in text
    return errors[0]


# ------------------------------------------------------------------------------ demo run
def test_finetune_demo_trains_evaluates_and_keeps_the_best_checkpoint():
    runs = demo_runs()
    log = read_log(os.path.join(runs["finetune_dir"], "log.txt"))
    assert [r["epoch"] for r in log] == list(range(FINETUNE_EPOCHS))
    assert all(r["test_images"] == 359 for r in log)  # the whole validation set, once
    best = load_checkpoint(runs["best"])
    assert best["kind"] == "finetune"
    assert best["class_names"] == [str(d) for d in range(10)]
    assert best["best_acc1"] == pytest.approx(max(r["test_acc1"] for r in log))
    best_epoch = max(log, key=lambda r: r["test_acc1"])["epoch"]
    assert best["epoch"] == best_epoch
    assert max(r["test_acc1"] for r in log) > 20.0  # well above chance (10%)
    assert os.path.isfile(os.path.join(runs["finetune_dir"], f"checkpoint-{FINETUNE_EPOCHS - 1}.pd"))


def test_eval_with_resume_only_evaluates_and_reproduces_the_logged_accuracy():
    runs = demo_runs()
    before = sorted(os.listdir(runs["finetune_dir"]))
    stats = classify_cli.run(["--eval", "--resume", runs["best"], "--output_dir", runs["finetune_dir"],
                               "--num_workers", "0"])
    assert sorted(os.listdir(runs["finetune_dir"])) == before  # nothing trained or written
    assert stats["images"] == 359
    assert stats["acc1"] == pytest.approx(load_checkpoint(runs["best"])["best_acc1"], abs=1e-6)


@pytest.mark.slow
def test_auto_resume_continues_after_the_last_completed_epoch(tmp_path):
    runs = demo_runs()
    out = tmp_path / "ft"
    shutil.copytree(runs["finetune_dir"], out)
    runner = classify_cli.run(["--finetune", runs["pretrain"], "--output_dir", str(out),
                                "--epochs", str(FINETUNE_EPOCHS + 1), "--auto_resume", "true",
                                "--num_workers", "0", "--print_freq", "100"])
    assert runner.start_epoch == FINETUNE_EPOCHS
    log = read_log(out / "log.txt")
    assert [r["epoch"] for r in log] == list(range(FINETUNE_EPOCHS + 1))


@pytest.mark.parametrize("auto_resume", ["true", "false"])
def test_finetune_into_a_pretraining_folder_stops_before_overwriting_it(tmp_path, capsys, auto_resume):
    runs = demo_runs()
    shared = tmp_path / "output_dir"
    shared.mkdir()
    shutil.copy(runs["pretrain"], shared / "checkpoint-0.pd")
    before = (shared / "checkpoint-0.pd").read_bytes()
    rc = classify_cli.main(["--finetune", str(shared / "checkpoint-0.pd"), "--output_dir", str(shared),
                             "--epochs", "1", "--max_train_step", "2", "--num_workers", "0",
                             "--auto_resume", auto_resume])
    assert rc == 2
    line = one_line_error(capsys.readouterr().err)
    assert str(shared / "checkpoint-0.pd") in line
    assert "pretrain checkpoint of mae_vit_base_patch16" in line and "--output_dir" in line
    assert (shared / "checkpoint-0.pd").read_bytes() == before
    assert sorted(os.listdir(shared)) == ["checkpoint-0.pd"]


def test_resume_of_another_kind_of_checkpoint_names_both_kinds(tmp_path, capsys):
    runs = demo_runs()
    rc = classify_cli.main(["--finetune", runs["pretrain"], "--resume", runs["pretrain"],
                             "--output_dir", str(tmp_path), "--epochs", "1", "--num_workers", "0"])
    assert rc == 2
    line = one_line_error(capsys.readouterr().err)
    assert runs["pretrain"] in line and "pretrain checkpoint of mae_vit_base_patch16" in line
    assert "finetune run of vit_base_patch16" in line


def test_eval_with_a_checkpoint_whose_head_does_not_fit_fails_in_one_line(tmp_path, capsys):
    runs = demo_runs()
    rc = classify_cli.main(["--eval", "--resume", runs["pretrain"], "--num_workers", "0",
                             "--output_dir", str(tmp_path)])
    assert rc == 2
    line = one_line_error(capsys.readouterr().err)
    assert runs["pretrain"] in line and "no classifier head" in line and "10 classes" in line
    # a plain state dict of the fine-tuned weights (10 classes) against a 12-class model
    plain = tmp_path / "plain.pd"
    from paddle_cae.runtime.checkpoint import save_checkpoint

    save_checkpoint(load_checkpoint(runs["best"])["model"], plain)
    rc = classify_cli.main(["--eval", "--resume", str(plain), "--nb_classes", "12",
                             "--num_workers", "0", "--output_dir", str(tmp_path)])
    assert rc == 2
    line = one_line_error(capsys.readouterr().err)
    assert str(plain) in line and "[64, 10]" in line and "12 classes" in line
    # the same file evaluates when the class count fits
    stats = classify_cli.run(["--eval", "--resume", str(plain), "--num_workers", "0",
                               "--output_dir", str(tmp_path)])
    assert stats["acc1"] == pytest.approx(load_checkpoint(runs["best"])["best_acc1"], abs=1e-6)


DEMO_CONFIGS = ROOT / "configs" / "demo"


def demo_header_commands(path):
    import shlex

    return [shlex.split(line[1:].strip()) for line in path.read_text().splitlines()
            if line.startswith("# python main_")]


def parse_demo_command(argv):
    """(entrypoint, the config the command runs with, parsed args)."""
    from paddle_cae.cli.finetune_args import parse_finetune_args, parse_linprobe_args
    from paddle_cae.cli.pretrain_args import parse_pretrain_args

    script, rest = argv[1], argv[2:]
    if script == "main_pretrain.py":
        rest, config = pretrain_cli.demo_argv(rest)
        args = parse_pretrain_args(rest)
    else:
        phase = "finetune" if script == "main_finetune.py" else "linprobe"
        rest, config = classify_cli.demo_argv(rest, phase)
        args = (parse_finetune_args if phase == "finetune" else parse_linprobe_args)(rest)
    if "--config" in rest:
        config = rest[rest.index("--config") + 1]
    return script, config, args


def test_demo_configs_resume_by_default_write_their_own_folders_and_their_commands_chain():
    """Each classifier demo config's header commands: the pretraining command writes the
    checkpoint the next command reads, and the next command runs with this very config."""
    import yaml

    outputs = {}
    for path in sorted(DEMO_CONFIGS.glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        if not path.name.startswith("learning_"):
            assert config["auto_resume"] is True, path.name
        out = os.path.normpath(config["output_dir"])
        assert out not in outputs, f"{path.name} and {outputs.get(out)} share {out}"
        outputs[out] = path.name
    checked = 0
    for path in sorted(DEMO_CONFIGS.glob("*.yaml")):
        if not path.name.startswith(("finetune_", "linprobe_")):
            continue
        commands = demo_header_commands(path)
        assert [c[1] for c in commands] == ["main_pretrain.py", path.name.split("_")[0].replace(
            "finetune", "main_finetune.py").replace("linprobe", "main_linprobe.py")], path.name
        cwd = os.getcwd()
        os.chdir(ROOT)
        try:
            _, _, pre = parse_demo_command(commands[0])
            _, config, args = parse_demo_command(commands[1])
        finally:
            os.chdir(cwd)
        assert os.path.samefile(ROOT / config, path), (path.name, config)
        expected = os.path.join(pre.output_dir, f"checkpoint-{pre.epochs - 1}.pd")
        assert os.path.normpath(args.finetune) == os.path.normpath(expected), path.name
        checked += 1
    assert checked == 6


# ----------------------------------------------------------------------- loading weights
def fixture_classifier(folder, name):
    cfg = json.loads((FIXTURES / folder / "config.json").read_text())["model_args"]
    kwargs = {k: cfg[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads",
                                  "mlp_ratio") if k in cfg}
    if name.startswith("cae"):
        kwargs["init_values"] = cfg.get("init_values", 0.1)
    return create_model(name, num_classes=7, **kwargs)


FIXTURE_CASES = [
    ("mae_pretrain", "vit_base_patch16", ""),
    ("cae_pretrain", "cae_base_patch16_224", "encoder."),
    ("bootmae_pretrain", "bootmae_base_patch16_224", ""),
    ("mae_vit_finetune", "vit_base_patch16", ""),
    ("cae_finetune", "cae_base_patch16_224", ""),
    ("bootmae_finetune", "bootmae_base_patch16_224", ""),
]


@pytest.mark.parametrize("folder,name,prefix", FIXTURE_CASES)
def test_official_fixture_checkpoint_loads_its_encoder_through_the_converter(folder, name, prefix):
    model = fixture_classifier(folder, name)
    report = load_pretrained(model, FIXTURES / folder / "checkpoint.pth")
    reference = np.load(FIXTURES / folder / "weights.npz")
    own = model.state_dict()
    checked = 0
    for key in own:
        source = prefix + key
        if key.startswith(("blocks.", "patch_embed.", "cls_token")) and source in reference \
                and "relative_position" not in key:
            expected = reference[source]
            got = own[key].numpy()
            if got.ndim == 2 and "weight" in key:  # Linear: paddle [in, out]
                expected = expected.T
            np.testing.assert_array_equal(got, expected)
            checked += 1
    assert checked > 10
    assert set(report.initialised) <= {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias",
                                       "blocks.0.attn.relative_position_bias_table",
                                       "blocks.1.attn.relative_position_bias_table"}
    assert any(line.startswith("  loaded") for line in report.lines())


def test_cae_loading_starts_fc_norm_from_the_encoder_norm():
    model = fixture_classifier("cae_pretrain", "cae_base_patch16_224")
    load_pretrained(model, FIXTURES / "cae_pretrain" / "checkpoint.pth")
    reference = np.load(FIXTURES / "cae_pretrain" / "weights.npz")
    np.testing.assert_array_equal(model.fc_norm.weight.numpy(), reference["encoder.norm.weight"])


def test_finetune_command_line_accepts_an_official_checkpoint(tmp_path):
    with captured_log() as log:
        rc = classify_cli.main(["--finetune", str(FIXTURES / "mae_pretrain" / "checkpoint.pth"),
                                "--model_args", '{"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4}',
                                "--output_dir", str(tmp_path), "--epochs", "1", "--max_train_step", "2",
                                "--num_workers", "0"])
    assert rc == 0
    out = log.text
    assert "ignored, pretraining-only" in out and "newly initialised" in out
    assert os.path.isfile(tmp_path / "checkpoint-best.pd")


def test_learned_position_table_is_resized_to_a_larger_input():
    runs = demo_runs()
    model = create_model("vit_base_patch16", num_classes=10, img_size=48, **DEMO_CLASSIFIER)
    report = load_pretrained(model, runs["pretrain"])
    assert tuple(model.pos_embed.shape) == (1, 1 + 12 * 12, 64)
    assert any(key == "pos_embed" for key, _ in report.adapted)
    source = load_checkpoint(runs["pretrain"])["model"]["pos_embed"]
    np.testing.assert_allclose(model.pos_embed.numpy()[:, :1], source[:, :1])  # cls row kept


def test_relative_position_table_resampling_keeps_a_smooth_table_and_the_cls_rows():
    src_grid, dst_grid, heads = 7, 14, 3
    rows = np.arange(2 * src_grid - 1, dtype=np.float32) - (src_grid - 1)
    plane = (rows[:, None] * 0.5 + rows[None, :] * 0.25).reshape(-1)  # linear in the offsets
    table = np.concatenate([np.stack([plane * (h + 1) for h in range(heads)], 1),
                            np.full((3, heads), 9.0, np.float32)])
    out = resample_rel_pos_table(table, (dst_grid, dst_grid))
    assert out.shape == ((2 * dst_grid - 1) ** 2 + 3, heads)
    np.testing.assert_array_equal(out[-3:], table[-3:])
    grid = out[:-3, 0].reshape(2 * dst_grid - 1, 2 * dst_grid - 1)
    centre = dst_grid - 1
    assert grid[centre, centre] == pytest.approx(0.0, abs=1e-4)  # zero offset stays zero
    assert np.all(np.diff(grid[:, centre]) > 0)  # still increasing along the row offsets
    np.testing.assert_array_equal(resample_rel_pos_table(table, (src_grid, src_grid)), table)


# ------------------------------------------------------- Paddle-native files (PASSL / PLSC)
SMALL_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def paddle_saved(obj, path):
    """Write ``obj`` the way Paddle trainers do (paddle.save of parameters, not numpy)."""
    paddle.save(obj, str(path))
    return path


def test_paddle_save_of_a_nested_model_dict_loads_through_the_safe_reader(tmp_path):
    """PASSL/PLSC-style CAE pretraining checkpoint: {"model": state_dict} written by paddle.save
    (tensors stored as (name, array) inside the nested dict), with PASSL's key names."""
    paddle.seed(1)
    source = create_model("cae_base_patch16_224", num_classes=5, init_values=0.1, **SMALL_VIT)
    encoder = {k: v for k, v in source.state_dict().items() if not k.startswith(("head.", "fc_norm."))}
    state = {"encoder." + k: v for k, v in encoder.items()}
    state.update({"teacher_network." + k: v for k, v in encoder.items()})
    state["regressor_and_decoder.regressor_blocks.0.norm1_q_cross.weight"] = paddle.ones([32])
    state["encoder_to_decoder.weight"] = paddle.ones([32, 32])
    state["mask_token"] = paddle.zeros([1, 1, 32])
    path = paddle_saved({"model": state, "epoch": 799}, tmp_path / "passl_cae_pretrain.pd")
    model = create_model("cae_base_patch16_224", num_classes=5, init_values=0.1, **SMALL_VIT)
    report = load_pretrained(model, path)
    np.testing.assert_array_equal(model.blocks[1].attn.qkv.weight.numpy(),
                                  source.blocks[1].attn.qkv.weight.numpy())
    np.testing.assert_array_equal(model.blocks[0].attn.q_bias.numpy(), source.blocks[0].attn.q_bias.numpy())
    ignored = {k for k, _ in report.ignored}
    assert "teacher_network.blocks.0.attn.qkv.weight" in ignored and "mask_token" in ignored
    assert "regressor_and_decoder.regressor_blocks.0.norm1_q_cross.weight" in ignored
    assert set(report.initialised) <= {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert any(line.startswith("  loaded") for line in report.lines())


def test_passl_mae_pdparams_layouts_load_with_the_usual_report(tmp_path):
    """A flat .pdparams of PASSL's MAE pretraining model (official key names, Paddle layout)
    and the same weights nested under "model"."""
    paddle.seed(2)
    pre = create_model("mae_vit_base_patch16", decoder_embed_dim=16, decoder_depth=1,
                       decoder_num_heads=2, **SMALL_VIT)
    flat = paddle_saved(pre.state_dict(), tmp_path / "mae_pretrain.pdparams")
    nested = paddle_saved({"model": pre.state_dict(), "optimizer": {}}, tmp_path / "mae_nested.pd")
    for path in (flat, nested):
        model = create_model("vit_base_patch16", num_classes=5, global_pool=True, **SMALL_VIT)
        report = load_pretrained(model, path)
        np.testing.assert_array_equal(model.blocks[0].mlp.fc1.weight.numpy(),
                                      pre.blocks[0].mlp.fc1.weight.numpy())
        ignored = {k for k, _ in report.ignored}
        assert {"decoder_embed.weight", "mask_token", "decoder_pred.weight"} <= ignored
        assert "StructuredToParameterName@@" not in ignored
        assert set(report.initialised) <= {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}


def test_passl_style_finetuned_classifier_predicts_through_the_api(tmp_path):
    from paddle_cae.api import load_checkpoint as load_for_inference

    paddle.seed(3)
    trained = create_model("vit_base_patch16", num_classes=40, **SMALL_VIT)  # 40 classes > width 32
    path = paddle_saved({"model": trained.state_dict()}, tmp_path / "finetuned.pd")
    model = load_for_inference(str(path), model_name="vit_base_patch16", model_args=SMALL_VIT)
    x = paddle.to_tensor(np.random.RandomState(0).standard_normal((2, 3, 32, 32)).astype("float32"))
    trained.eval()
    np.testing.assert_allclose(model(x).numpy(), trained(x).numpy(), atol=1e-5)


RELPOS_FIXTURE = ROOT / "tests" / "data" / "relpos_resample.npz"  # tools/make_relpos_fixture.py


def test_relative_position_table_resampling_matches_scipy_bicubic_interpolation(monkeypatch):
    """The official code's scipy interp2d(kind='cubic') results (computed once with SciPy into
    the fixture); scipy must not be needed here."""
    import sys

    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.interpolate", None)
    data = np.load(RELPOS_FIXTURE)
    cases = sorted(int(k.split("_")[1]) for k in data.files if k.startswith("table_"))
    assert len(cases) >= 4
    for n in cases:
        table, (src_grid, dst_grid) = data[f"table_{n}"], data[f"grids_{n}"]
        out = resample_rel_pos_table(table, (int(dst_grid), int(dst_grid)))
        expected = data[f"expected_{n}"]
        assert out.shape == ((2 * dst_grid - 1) ** 2 + 3, table.shape[1])
        np.testing.assert_allclose(out[:-3], expected, rtol=0, atol=1e-6 * np.abs(expected).max())
        np.testing.assert_array_equal(out[-3:], table[-3:])


def test_cae_finetuning_at_another_resolution_resamples_the_relative_position_tables(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.interpolate", None)
    cfg = json.loads((FIXTURES / "cae_finetune" / "config.json").read_text())["model_args"]
    model = create_model("cae_base_patch16_224", num_classes=7, img_size=48, patch_size=8,
                         embed_dim=64, depth=2, num_heads=4, init_values=cfg["init_values"])
    report = load_pretrained(model, FIXTURES / "cae_finetune" / "checkpoint.pth")
    reference = np.load(FIXTURES / "cae_finetune" / "weights.npz")
    key = "blocks.1.attn.relative_position_bias_table"
    assert reference[key].shape == (7 * 7 + 3, 4)
    got = model.state_dict()[key].numpy()
    assert got.shape == (11 * 11 + 3, 4)
    np.testing.assert_allclose(got, resample_rel_pos_table(reference[key], (6, 6)), atol=1e-7)
    assert any(k == key and "resampled" in what for k, what in report.adapted)
    assert key not in report.initialised


def test_wrong_model_checkpoint_is_a_one_line_error(tmp_path, capsys):
    runs = demo_runs()
    rc = classify_cli.main(["--finetune", runs["pretrain"], "--model", "cae_base_patch16_224",
                             "--model_args", json.dumps(DEMO_CLASSIFIER), "--input_size", "32",
                             "--output_dir", str(tmp_path), "--num_workers", "0"])
    assert rc != 0
    line = one_line_error(capsys.readouterr().err)
    assert runs["pretrain"] in line and "encoder weights" in line


def test_missing_finetune_file_is_a_one_line_error(tmp_path, capsys):
    rc = classify_cli.main(["--finetune", str(tmp_path / "nope.pd"), "--output_dir", str(tmp_path)])
    assert rc != 0
    assert "nope.pd" in one_line_error(capsys.readouterr().err)


# ------------------------------------------------------------------- distributed evaluation
def test_shard_sampler_gives_every_index_to_exactly_one_rank():
    for n, world in ((359, 2), (7, 4), (3, 5)):
        seen = [i for rank in range(world) for batch in ShardSampler(n, 16, world, rank) for i in batch]
        assert sorted(seen) == list(range(n))


def test_two_rank_evaluation_adds_up_to_the_single_process_counts():
    paddle.seed(0)
    config = {"model": "vit_base_patch16", "num_classes": 10, "input_size": 32,
              "model_args": DEMO_CLASSIFIER, "global_pool": True}
    model = build_classifier(config, for_training=False)
    val = build_dataset("val", None, build_eval_transform(32))
    whole = evaluate(model, build_eval_loader(val, 64, DistEnv(0, 1), dist_eval=True))
    parts = [evaluate(model, build_eval_loader(val, 64, DistEnv(rank, 2), dist_eval=True))
             for rank in range(2)]
    assert sum(p["images"] for p in parts) == whole["images"] == len(val)
    correct = sum(p["acc1"] * p["images"] for p in parts) / 100.0
    assert correct == pytest.approx(whole["acc1"] * whole["images"] / 100.0, abs=1e-6)


# ----------------------------------------------------------------------------------- EMA
def test_model_ema_moves_towards_the_weights_by_one_minus_decay():
    layer = paddle.nn.Linear(3, 2)
    ema = ModelEma(layer, decay=0.9)
    start = layer.weight.numpy().copy()
    layer.weight.set_value(start + 1.0)
    ema.update(layer)
    np.testing.assert_allclose(ema.state["weight"].numpy(), start + 0.1, rtol=1e-6)
    with ema.swapped_into(layer):
        np.testing.assert_allclose(layer.weight.numpy(), start + 0.1, rtol=1e-6)
    np.testing.assert_allclose(layer.weight.numpy(), start + 1.0)


# --------------------------------------------------------------------------- seed commands
def seed_commands():
    values = {"${MODEL}": "bootmae_base", "${LAYER}": "9"}
    for line in (ROOT / "tests" / "data" / "seed_classify_commands.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            kind, *argv = line.split()
            yield kind, [values.get(a, a) for a in argv]


@pytest.mark.parametrize("kind,argv", list(seed_commands()))
def test_seed_command_lines_parse_with_their_meaning(kind, argv):
    from paddle_cae.cli.finetune_args import parse_finetune_args, parse_linprobe_args

    args = (parse_linprobe_args if kind == "L" else parse_finetune_args)(argv)
    given = dict(zip(argv, argv[1:]))
    if "--lr" in given:
        assert args.lr == float(given["--lr"])
    if "--blr" in given:
        assert args.blr == float(given["--blr"])
    if "--use_cls" in argv:
        assert args.global_pool is False
    if "--global_pool" in argv:
        assert args.global_pool is True
    if "--disable_rel_pos_bias" in argv:
        assert args.rel_pos_bias is False
    if "--update_freq" in given:
        assert args.accum_iter == int(given["--update_freq"])
    assert args.eval == ("--eval" in argv)
    assert args.model in ("cae_base_patch16_224", "vit_base_patch16", "bootmae_base_patch16_224")


@pytest.mark.parametrize("method,small", [("mae", False), ("cae", True), ("bootmae", True)])
def test_demo_fine_tuning_at_32_px_takes_each_methods_official_transform_branch(method, small):
    from paddle_cae.data.transforms import RandomCrop, RandomResizedCrop
    from paddle_cae.inference.predict import preprocessing_spec
    from paddle_cae.cli.finetune_args import parse_finetune_args

    # the demo configs as shipped train CAE/BootMAE at 36 px: MAE's resized crop, no black padding
    shipped = parse_finetune_args(["--config", f"configs/demo/finetune_{method}.yaml"])
    assert isinstance(classify_cli.train_transform(shipped).transforms[0], RandomResizedCrop)
    args = parse_finetune_args(["--config", f"configs/demo/finetune_{method}.yaml", "--input_size", "32"])
    first = classify_cli.train_transform(args).transforms[0]
    assert isinstance(first, RandomCrop if small else RandomResizedCrop)
    if small:
        assert first.padding == 4
    steps = [type(t).__name__ for t in classify_cli.eval_transform(args).transforms]
    assert steps == (["ToTensor", "Normalize"] if small
                     else ["Resize", "CenterCrop", "ToTensor", "Normalize"])
    # inference of a 32-px model of a small-image method changes nothing of a 32-px image
    spec = preprocessing_spec(dict(input_size=32, transform_method=args.family if small else None))
    assert (spec["resize_short"], spec["crop_size"]) == ((32, 32) if small else (36, 32))
