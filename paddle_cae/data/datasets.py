"""ImageNet-style folder datasets.

Layout (the one torchvision's ImageFolder and every official script expect)::

    DATA_PATH/train/<class>/<image>
    DATA_PATH/val/<class>/<image>

A class is a sub-folder; classes are sorted by name and numbered from 0. Every sample is a
dict: the transform's output (an array becomes ``"images"``, a dict is taken as is) plus
``"labels"`` (int64) and ``"replaced"`` (int64: -1, or the index of the unreadable image this
sample stands in for). The loader counts ``replaced >= 0`` per epoch, so a corrupt file is
visible in the logs without stopping a 300-epoch run.

A pretraining :class:`.pipeline.Pipeline` is given the image *file* (an
:class:`.pipeline.ImageSource`): the file is opened for its header, the crop is drawn, then
decoded (at a reduced size with ``fast_decode``), and the images travel as uint8; the training
step makes the float32 tensors with the pipeline's ``conversions`` (:attr:`ImageFolder.conversions`).
With ``handover="float32"`` the loader converts them itself.
"""
import logging
import os
import random
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .pipeline import HANDOVERS, ImageSource, Pipeline, UnreadableImage, decode_ratio
from .transforms import _get, in_sample_rng, restart_sample_rng

logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SPLITS = ("train", "val")
MAX_REPLACEMENT_TRIES = 20
SCAN_PROGRESS_EVERY_S = 10.0  # a scan taking longer says how far it got, this often


class _PipelineError(RuntimeError):
    """The transform failed on a readable image."""


class DatasetLayoutError(ValueError):
    """The data folder does not have the DATA_PATH/<split>/<class>/<image> layout."""


def expected_layout(data_path="DATA_PATH"):
    return (
        "expected an ImageNet-style folder tree:\n"
        f"  {data_path}/\n"
        "    train/\n"
        "      <class_a>/<image>.jpg|jpeg|png|bmp|webp\n"
        "      <class_b>/<image>...\n"
        "    val/\n"
        "      <class_a>/<image>...\n"
        "      <class_b>/<image>...\n"
        "(one sub-folder per class, the same class names in train/ and val/)"
    )


def default_data_path():
    """The bundled demo dataset (handwritten digits, 32x32 PNG), used when no --data_path is given."""
    from ..resources import demo_data_path  # the checkout's demo/, else the installed copy

    return demo_data_path()


def pil_loader(path):
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()  # decode now, so a truncated or corrupt file fails here, not in a transform
        return img.convert("RGB")


def _has_image_extension(name, extensions):
    return name.lower().endswith(extensions)


class FolderScan:
    """Image files under class folders, each directory read once.

    Symbolic links to directories are followed (datasets are often assembled from links), but
    a directory reached a second time -- by a link back to itself or to a parent (``self -> .``,
    ``up -> ..``), to the split folder or to another class's folder, or by two links to one
    place -- is skipped and reported once at the end: ``os.walk(followlinks=True)`` listed the
    same images again at every level of such a loop. A scan that takes longer than
    :data:`SCAN_PROGRESS_EVERY_S` logs its progress."""

    def __init__(self, root, class_dirs, extensions, progress_every_s=SCAN_PROGRESS_EVERY_S):
        self.root = root
        self.extensions = extensions
        self.progress_every_s = progress_every_s
        self.seen = {}  # (device, inode) -> the path it belongs to
        for path in [root, *class_dirs]:  # the split folder and every class own theirs
            key = self._key(path)
            if key is not None:
                self.seen.setdefault(key, path)
        self.repeated = []  # (path, the path it is the same folder as)
        self.folders = 0
        self.files = 0
        self._started = time.monotonic()
        self._last_report = self._started

    @staticmethod
    def _key(path):
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def files_under(self, top):
        """Image paths under the class folder ``top``, recursively, in the order of the sorted
        folder paths (files sorted within each), skipping folders that are read elsewhere."""
        found = []  # (folder, its sorted image paths)
        stack = [top]
        while stack:
            directory = stack.pop()
            key = self._key(directory)
            if key is None:
                logger.warning("cannot read folder '%s'; skipped", directory)
                continue
            owner = self.seen.setdefault(key, directory)
            if owner != directory:
                self.repeated.append((directory, owner))
                continue
            self.folders += 1
            try:
                entries = list(os.scandir(directory))
            except OSError as err:
                logger.warning("cannot list folder '%s' (%s); skipped", directory, err.strerror)
                continue
            files = []
            for entry in entries:
                try:
                    is_dir = entry.is_dir()  # follows links, as os.walk(followlinks=True) did
                except OSError:
                    continue
                if is_dir:
                    stack.append(entry.path)
                elif _has_image_extension(entry.name, self.extensions):
                    files.append(entry.path)
            found.append((directory, sorted(files)))
            self.files += len(files)
            self._report_progress()
        return [path for _, files in sorted(found) for path in files]

    def _report_progress(self):
        now = time.monotonic()
        if now - self._last_report >= self.progress_every_s:
            self._last_report = now
            logger.info("scanning %s: %d images in %d folders so far (%.0f s)", self.root,
                        self.files, self.folders, now - self._started)

    def report_loops(self):
        if not self.repeated:
            return
        path, first = self.repeated[0]
        more = f" (and {len(self.repeated) - 1} more)" if len(self.repeated) > 1 else ""
        logger.warning("%s: the folder '%s' is '%s' again (a symbolic link loop or a second "
                       "link to one folder)%s; each folder was read once", self.root, path, first,
                       more)


def find_classes(root):
    entries = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    return entries, {name: i for i, name in enumerate(entries)}


class ImageFolder:
    """Images in ``root/<class>/<image>``, read with PIL as RGB.

    An image that cannot be read is logged once (per process), remembered, and replaced by the
    next readable index (``(index + k) % len``), so the choice is deterministic. Subclassing
    ``paddle.io.Dataset`` is not needed: the DataLoader only uses ``__getitem__``/``__len__``.
    """

    def __init__(self, root, transform=None, extensions=IMG_EXTENSIONS, loader=pil_loader,
                 handover="uint8", fast_decode=False):
        if handover not in HANDOVERS:
            raise ValueError(f"ImageFolder: handover must be one of {HANDOVERS}, got {handover!r}")
        self.root = str(root)
        self.transform = transform
        self.loader = loader
        self.handover = handover
        self.decode_ratio = decode_ratio(fast_decode)  # checked here, where the value is given
        self.fast_decode = fast_decode
        self.extensions = tuple(e.lower() for e in extensions)
        self._check_root()
        self.classes, self.class_to_idx = find_classes(self.root)
        self.samples = self._scan()
        self.targets = [label for _, label in self.samples]
        self.known_bad = set()  # indices whose file failed to load; filled here and by the loader

    @property
    def class_names(self):
        return list(self.classes)

    def _check_root(self):
        if not os.path.isdir(self.root):
            raise DatasetLayoutError(f"image folder '{self.root}' does not exist; {expected_layout()}")

    def _scan(self):
        samples = []
        empty = []
        scan = FolderScan(self.root, [os.path.join(self.root, n) for n in self.classes],
                          self.extensions)
        for name in self.classes:
            files = scan.files_under(os.path.join(self.root, name))
            if not files:
                empty.append(name)
            samples.extend((path, self.class_to_idx[name]) for path in files)
        scan.report_loops()
        if not self.classes or not samples:
            loose = [f for f in sorted(os.listdir(self.root)) if _has_image_extension(f, self.extensions)]
            hint = (f" It holds {len(loose)} images directly (e.g. '{loose[0]}'): move them into one"
                    " sub-folder per class." if loose else "")
            raise DatasetLayoutError(
                f"no images found in class sub-folders of '{self.root}'.{hint}\n{expected_layout()}")
        if empty:
            logger.warning("%s: %d class folder(s) without images: %s", self.root, len(empty), ", ".join(empty[:10]))
        return samples

    def __len__(self):
        return len(self.samples)

    def _load(self, index, read=None):
        """Returns (``read(path)``, default the loader's image; index actually used; index
        replaced or -1). ``read`` raising :class:`_PipelineError` stops; any other error means
        the file is unreadable and the next index is tried."""
        read = read or self.loader
        n = len(self.samples)
        for k in range(min(MAX_REPLACEMENT_TRIES, n)):
            candidate = (index + k) % n
            if candidate in self.known_bad:
                continue
            path = self.samples[candidate][0]
            try:
                out = read(path)
            except _PipelineError:
                raise
            except Exception as err:  # noqa: BLE001  any decoder error means "unreadable"
                self.known_bad.add(candidate)
                logger.warning("cannot read image '%s' (%s: %s); using the next sample instead",
                               path, type(err).__name__, err)
                continue
            return out, candidate, (-1 if k == 0 else index)
        raise RuntimeError(
            f"{MAX_REPLACEMENT_TRIES} consecutive images from '{self.samples[index][0]}' on could not be "
            f"read; check the dataset under '{self.root}'")

    def _pipeline_error(self, path, mode, size, err, transform):
        # Not a decoding problem (the file was read): a bug or an unsupported setting in the
        # pipeline. Name the image and the pipeline, and stop rather than skip the sample.
        return _PipelineError(
            f"the transform failed on image '{path}' ({mode} {size[0]}x{size[1]}): "
            f"{type(err).__name__}: {err}; transform: {transform!r}")

    @property
    def conversions(self):
        """Image key -> :class:`.pipeline.ToFloat` the training step applies to the uint8
        images of a batch (empty: the samples are float already)."""
        if self.handover == "float32" or not isinstance(self.transform, Pipeline):
            return {}
        return dict(self.transform.conversions)

    def _reads_files(self):
        return isinstance(self.transform, Pipeline) and self.loader is pil_loader

    def _read_source(self, path):
        source = ImageSource(path, self.decode_ratio)
        # the pipeline draws before it decodes: an unreadable file must not use up the draws of
        # the sample that replaces it (outside a sample_rng block: the global generators)
        state = None if in_sample_rng() else (random.getstate(), np.random.get_state())
        try:
            return self.transform(source)
        except UnreadableImage:
            if state is None:
                restart_sample_rng()
            else:
                random.setstate(state[0])
                np.random.set_state(state[1])
            raise
        except Exception as err:
            raise self._pipeline_error(path, source.img.mode, source.size, err, self.transform) from err

    def __getitem__(self, index):
        if self._reads_files():
            out, used, replaced = self._load(int(index), self._read_source)
        else:
            img, used, replaced = self._load(int(index))
            if self.transform is None:
                out = np.asarray(img)
            else:
                try:
                    out = self.transform(img)
                except Exception as err:
                    raise self._pipeline_error(self.samples[used][0], img.mode, img.size, err,
                                               self.transform) from err
        if self.handover == "float32" and isinstance(self.transform, Pipeline):
            out = self.transform.to_floats(out)
        sample = dict(out) if isinstance(out, dict) else {"images": out}
        sample["labels"] = np.int64(self.samples[used][1])
        sample["replaced"] = np.int64(replaced)
        return sample

    def summary(self):
        return f"{self.root}: {len(self.samples)} images in {len(self.classes)} classes"

    def __repr__(self):
        return f"ImageFolder({self.summary()}, transform={self.transform!r})"


def split_folder(data_path, split):
    """``DATA_PATH/<split>``, with a clear error if the layout is wrong.

    For ``split='train'`` a path that already ends in ``train`` and contains class folders is
    accepted as is (the CAE scripts pass ``.../imagenet/train``)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
    data_path = str(data_path)
    if not os.path.isdir(data_path):
        raise DatasetLayoutError(f"--data_path '{data_path}' does not exist; {expected_layout(data_path)}")
    folder = os.path.join(data_path, split)
    if os.path.isdir(folder):
        return folder
    if os.path.basename(os.path.normpath(data_path)) == split:
        return data_path
    present = sorted(os.listdir(data_path))[:8]
    raise DatasetLayoutError(
        f"--data_path '{data_path}' has no '{split}/' folder (it contains: {', '.join(present) or 'nothing'}); "
        f"{expected_layout(data_path)}")


def build_dataset(split, data_path=None, transform=None, options=None):
    """``ImageFolder`` over ``data_path/split`` (``data_path`` None -> the bundled demo digits).
    ``options`` (a Namespace or dict, e.g. the run's args) may set ``data_handover``
    ('uint8', the default, or 'float32') and ``fast_decode`` (default False; True or a ratio,
    see ``pipeline.decode_ratio``)."""
    data_path = data_path or default_data_path()
    handover = _get(options or {}, "data_handover", "uint8")
    fast_decode = _get(options or {}, "fast_decode", False)
    dataset = ImageFolder(split_folder(data_path, split), transform=transform, handover=handover,
                          fast_decode=fast_decode)
    logger.info("%s set: %s", split, dataset.summary())
    return dataset
