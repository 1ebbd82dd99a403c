"""examples/quickstart.ipynb is committed executed, so that a reader sees the results without
running it: an install cell, one thread, every code cell run in order without an error, the loss
plot and the reconstruction as pictures, and the README's example digit predicted as a 3."""
import base64
import io
import json
from pathlib import Path

from PIL import Image

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


def cells():
    return [c for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"]


def source(cell):
    return "".join(cell["source"])


def pictures(cell):
    found = []
    for out in cell.get("outputs", []):
        data = out.get("data", {})
        if "image/png" in data:
            found.append(Image.open(io.BytesIO(base64.b64decode(data["image/png"]))))
    return found


def test_install_cell_and_one_thread_come_first():
    code = cells()
    assert "pip" in source(code[0]) and "requirements.txt" in source(code[0])
    setup = source(code[1])
    assert 'os.environ["OMP_NUM_THREADS"] = "1"' in setup
    assert setup.index("OMP_NUM_THREADS") < setup.index("from paddle_cae")


def test_every_code_cell_ran_in_order_without_errors():
    code = cells()
    counts = [c["execution_count"] for c in code]
    assert counts == list(range(1, len(code) + 1)), counts
    errors = [o for c in code for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert not errors, [e.get("ename") for e in errors]


def test_loss_plot_and_reconstruction_are_pictures():
    code = cells()
    loss = [c for c in code if "line_plot({\"pretraining loss\"" in source(c)]
    recon = [c for c in code if "reconstruction_figure(" in source(c)]
    assert len(loss) == 1 and len(recon) == 1
    for cell in loss + recon:
        shown = pictures(cell)
        assert shown and shown[0].width >= 300, source(cell)[:80]
        colours = shown[0].convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 4  # not a blank picture


def test_the_example_digit_is_predicted_as_a_three():
    predict = [c for c in cells() if "predict(model, str(image)" in source(c)]
    assert len(predict) == 1
    text = "".join("".join(o.get("text", "")) for o in predict[0]["outputs"] if o["output_type"] == "stream")
    assert text.splitlines()[0].startswith("3: "), text
