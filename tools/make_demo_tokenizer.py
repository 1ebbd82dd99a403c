"""Write the tokenizer the CAE demo uses when the real DALL-E weights are not at hand.

It is a small DALL-E encoder (n_hid 16, one block per group, vocabulary 512) whose weights
are a FIXED RANDOM initialisation: every conv weight ~ N(0, 1/fan_in) (the encoder's own
initialiser), biases 0, paddle.seed(0). Its tokens are a deterministic function of the
image, which is enough to run CAE end to end on a CPU, but they are not the DALL-E
codebook: results with it are not comparable with the paper's. For real runs pass the
official encoder.pkl with --discrete_vae_weight_path.

    python tools/make_demo_tokenizer.py [--out demo/tokenizer/dalle_random_n16_v512.pd]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import paddle  # noqa: E402

from paddle_cae.models.dalle import DalleEncoder  # noqa: E402
from paddle_cae.runtime.checkpoint import save_checkpoint  # noqa: E402

ARCH = dict(group_count=4, n_hid=16, n_blk_per_group=1, input_channels=3, vocab_size=512)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join("demo", "tokenizer", "dalle_random_n16_v512.pd"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paddle.seed(args.seed)
    encoder = DalleEncoder(**ARCH)
    state = {k: v.numpy() for k, v in encoder.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_checkpoint(state, args.out)
    print(f"wrote {args.out}: DALL-E encoder {ARCH}, fixed random weights (seed {args.seed})")


if __name__ == "__main__":
    main()
