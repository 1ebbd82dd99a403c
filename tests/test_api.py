"""The notebook API and the quickstart notebook (its code cells run top to bottom on CPU)."""
import json
import os
from pathlib import Path

import numpy as np
import paddle
import pytest

import paddle_cae
from paddle_cae.runtime.checkpoint import save_checkpoint
from paddle_cae import create_model, load_checkpoint, predict
from tests.test_finetune import demo_runs

ROOT = Path(__file__).resolve().parents[1]


def test_package_exports_the_notebook_api():
    assert paddle_cae.create_model is create_model
    assert callable(load_checkpoint) and callable(predict)


def test_predict_returns_topk_pairs_for_every_image_of_a_folder():
    model = load_checkpoint(demo_runs()["best"])
    folder = ROOT / "demo" / "digits" / "val" / "4"
    results = predict(model, str(folder), topk=3)
    assert len(results) == len(os.listdir(folder))
    for pairs in results:
        assert len(pairs) == 3
        assert all(name in model.class_names for name, _ in pairs)
        probs = [p for _, p in pairs]
        assert probs == sorted(probs, reverse=True)


@pytest.mark.slow
def test_quickstart_notebook_code_runs_top_to_bottom(tmp_path, monkeypatch):
    notebook = json.loads((ROOT / "examples" / "quickstart.ipynb").read_text())
    cells = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
    assert len(cells) >= 4
    monkeypatch.setenv("QUICKSTART_OUT", str(tmp_path))
    monkeypatch.chdir(ROOT)
    namespace = {"__name__": "__quickstart__"}
    for source in cells:
        exec(compile(source, "quickstart.ipynb", "exec"), namespace)
    assert (tmp_path / "finetune" / "checkpoint-best.pd").is_file()
    assert len(namespace["top5"]) == 5
    assert namespace["figure"].width > 0


def test_head_class_count_follows_the_weight_layout_not_the_smaller_side():
    from paddle_cae.api import _head_classes

    # a ViT-B ImageNet head: 768 features -> 1000 classes
    assert _head_classes({"head.weight": np.zeros((768, 1000))}, "paddle") == 1000
    assert _head_classes({"head.weight": np.zeros((1000, 768))}, "torch") == 1000
    assert _head_classes({"head.weight": np.zeros((1000, 768)), "head.bias": np.zeros(1000)},
                         "paddle") == 1000
    assert _head_classes({"head.1.weight": np.zeros((10, 64))}, "torch") == 10


def test_plain_state_dict_with_more_classes_than_features_loads_for_inference(tmp_path):
    """A converted fine-tuned checkpoint whose head has more outputs than the embedding width
    (as ViT-B: 768 -> 1000) rebuilds with the right class count and its own head."""
    small = {"patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2, "img_size": 32}
    source = create_model("vit_base_patch16", num_classes=40, **small)
    state = {k: v.numpy() for k, v in source.state_dict().items()}
    path = tmp_path / "converted.pd"
    save_checkpoint(state, path)
    model = load_checkpoint(str(path), model_name="vit_base_patch16", model_args=small)
    assert tuple(model.head.weight.shape) == (16, 40)
    np.testing.assert_array_equal(model.head.weight.numpy(), state["head.weight"])
    x = paddle.to_tensor(np.random.RandomState(0).standard_normal((2, 3, 32, 32)).astype("float32"))
    source.eval()
    np.testing.assert_allclose(model(x).numpy(), source(x).numpy(), atol=1e-5)
