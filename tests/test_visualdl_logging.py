"""What VisualDL shows a user: curves against the optimizer step (one point per logged update,
not rounded thousands of images), the images seen as their own curve, the loss group ahead of
the optimizer group, no flat loss-scale chart without fp16, reconstructions large enough to
read, and the run's hyper-parameters."""
import numpy as np

from paddle_cae.cli.pretrain import run
from paddle_cae.runtime.logging import VisualDLWriter, enlarged


def read_back(log_dir):
    from visualdl import LogReader

    files = sorted(log_dir.glob("vdlrecords.*.log"))
    assert len(files) == 1
    return LogReader(file_path=str(files[0]))


def test_pretraining_curves_are_per_optimizer_step_loss_first_and_images_readable(tmp_path):
    out = tmp_path / "out"
    runner = run(["--config", "demo/mae.yaml", "--num_workers", "0", "--epochs", "2", "--max_train_step", "5",
                  "--batch_size", "16", "--print_freq", "1", "--vis_freq", "2", "--output_dir", str(out),
                  "--auto_resume", "false"])
    assert runner.global_step == 10
    reader = read_back(out / "vdl")
    tags = reader.get_tags()
    scalars = tags["scalar"]
    losses = reader.get_data("scalar", "loss/loss")
    assert [r.id for r in losses] == list(range(1, 11))  # every update its own point, x = step
    assert all(np.isfinite(r.value) for r in losses)
    seen = reader.get_data("scalar", "progress/images_seen")
    assert [(r.id, r.value) for r in seen] == [(s, 16.0 * s) for s in range(1, 11)]
    assert "opt/lr" in scalars and "opt/loss_scale" not in scalars  # no fp16 on the CPU
    loss_groups = [t for t in scalars if t.startswith("loss/")]
    assert loss_groups and sorted(scalars)[0].startswith("loss/")
    images = reader.get_data("image", "reconstruction")
    assert len(images) >= 2
    from io import BytesIO

    from PIL import Image

    with Image.open(BytesIO(images[0].image.encoded_image_string)) as img:
        assert img.height >= 256
    assert "run/arguments" in tags.get("text", [])
    texts = reader.get_data("text", "run/arguments")
    arguments = texts[0].text.encoded_text_string.splitlines()
    assert "mask_ratio: 0.75" in arguments and "batch_size: 16" in arguments


def test_writer_enlarges_with_whole_pixels_and_uses_the_steps_it_is_given(tmp_path):
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    big = enlarged(image, 7)
    assert big.shape == (8, 12, 3)  # factor 4: the smallest whole factor reaching 7 rows
    assert np.array_equal(big[::4, ::4], image) and np.array_equal(big[3, 11], image[0, 2])
    assert enlarged(image, 1) is image
    step = {"now": 3}
    writer = VisualDLWriter(str(tmp_path / "vdl"), step_of=lambda: step["now"])
    writer.add_scalar("train/loss", 1.5, step=1000)  # the caller's images-seen value is not the axis
    step["now"] = 4
    writer.add_scalar("train/loss", 1.25, step=2000)
    writer.skip_tags.add("opt/loss_scale")
    writer.add_scalar("opt/loss_scale", 1.0, step=2000)
    writer.close()
    reader = read_back(tmp_path / "vdl")
    assert [(r.id, r.value) for r in reader.get_data("scalar", "loss/loss")] == [(3, 1.5), (4, 1.25)]
    assert "opt/loss_scale" not in reader.get_tags()["scalar"]
