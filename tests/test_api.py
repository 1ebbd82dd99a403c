"""The notebook API and the quickstart notebook (its code cells run top to bottom on CPU)."""
import json
import os
from pathlib import Path

import paddle_cae
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
