"""Parity runner for the CAE pretraining model: encoder on the visible patches, latent
regressor, alignment target, decoder logits, both losses and the gradients of the total."""
import numpy as np
import paddle
import paddle.nn.functional as F

from paddle_cae.fast import accelerate
from paddle_cae.models.cae import ContextAutoencoderViT
from paddle_cae.models.dalle import load_dalle_encoder, map_pixels

# runtime flags of the reference tokenizer constructor that do not change the numbers on CPU
TOKENIZER_RUNTIME_ARGS = ("device", "requires_grad", "use_mixed_precision")


def _tokenizer(fx):
    """The reference tokenizer (the sibling dalle_encoder fixture's weights), or None when
    that folder is not next to this one."""
    ref = fx.config.get("reference", {}).get("tokenizer")
    path = fx.dir.parent / "dalle_encoder" / "checkpoint.pth"
    if not ref or not path.exists():
        return None
    arch = {k: v for k, v in ref.get("model_args", {}).items() if k not in TOKENIZER_RUNTIME_ARGS}
    return accelerate(load_dalle_encoder(path, **arch))


def run_cae_pretrain(fx):
    paddle.seed(0)
    model = accelerate(ContextAutoencoderViT(**fx.model_args))
    fx.load_into(model)
    model.train()  # as the reference (drop-path 0 in the fixture)

    images = paddle.to_tensor(fx.input("images"))
    mask = paddle.to_tensor(fx.input("bool_masked_pos"))
    target_ids = paddle.to_tensor(fx.input("target_ids"))

    # the tokenizer path: the model's own tokenisation of the second image gives the same ids
    tokenizer = _tokenizer(fx)
    if tokenizer is not None and "in_tok_images" in fx.case:
        mapped = map_pixels(paddle.to_tensor(fx.input("tok_images")))
        np.testing.assert_allclose(mapped.numpy(), fx.input("tok_images_mapped"), atol=1e-7, rtol=0)
        model.set_tokenizer(tokenizer)
        ids = model.tokenize(paddle.to_tensor(fx.input("tok_images_mapped")))
        np.testing.assert_array_equal(ids.numpy(), fx.input("target_ids"),
                                      err_msg=f"{fx.name}: tokenizer ids")

    out = model(images, mask, target_ids=target_ids)
    out["loss"].backward()

    fx.check("labels", out["labels"])
    fx.check("logits", out["logits"])
    fx.check("latent_pred", out["latent_pred"])
    fx.check("latent_target", out["latent_target"])
    fx.check("loss_main", out["loss_main"])
    fx.check("loss_align", out["loss_align"])
    fx.check("loss_align_mse", F.mse_loss(out["latent_pred"], out["latent_target"]))
    fx.check("loss_total", out["loss"])
    assert out["latent_target"].stop_gradient, f"{fx.name}: the alignment target carries a gradient"
    fx.check_model_grads(model, fx.config.get("grads"))


KINDS = {"cae_pretrain": run_cae_pretrain}
