"""Where the demo data and the recipe files are: in a checkout (or an editable install) the
repository's ``demo/`` and ``configs/``; in an installed package the copies that the build puts
into ``paddle_cae/_bundled/`` (``setup.py``), so that the installed commands run their demos from
any folder. ``--config`` also finds a recipe by name (``--config mae_vit_base_patch16_800e``,
``--config demo/mae``)."""
import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
REPO = PACKAGE.parent
BUNDLED = PACKAGE / "_bundled"


class MissingResourceError(FileNotFoundError):
    """Neither a checkout nor the installed package holds the demo file asked for."""


def _find(relative):
    for base in (REPO, BUNDLED):
        if (base / relative).exists():
            return base / relative
    return None


def resource_root():
    """The folder holding ``demo/`` and ``configs/``: the repository when it has them, else the
    package's bundled copy (also when neither exists, so that messages name the installed place)."""
    return REPO if (REPO / "demo" / "digits").is_dir() and (REPO / "configs").is_dir() else BUNDLED


def demo_data_path():
    """The bundled demo dataset (handwritten digits, 32x32 PNG)."""
    found = _find(Path("demo") / "digits")
    if found is None:
        raise MissingResourceError(
            f"the demo digits are not installed ({BUNDLED / 'demo' / 'digits'} is missing): "
            "give --data_path, or run from a checkout of the repository")
    return str(found)


def config_dir():
    """The recipe folder (``configs/``: pretrain/, finetune/, linprobe/, demo/)."""
    found = _find("configs")
    return str(found if found is not None else BUNDLED / "configs")


def find_config(value, phase=None, root=None):
    """``value`` of ``--config`` as a file path: as given if it exists, else under the recipe
    folder (with or without ``.yaml``), else a recipe NAME: ``<name>.yaml`` in ``configs/<phase>/``,
    then ``configs/demo/<phase>_<name>.yaml`` (fine-tuning, probing) and ``configs/demo/<name>.yaml``, then anywhere under ``configs/`` when
    exactly one file has that name. Returns the path, or ``value`` unchanged when nothing
    matches (the parser then reports it)."""
    if os.path.exists(value) or os.path.isabs(value):
        return value
    root = Path(root or config_dir())
    stem = value[:-5] if value.endswith(".yaml") else value
    for candidate in (root / value, root / f"{stem}.yaml"):
        if candidate.is_file():
            return str(candidate)
    if "/" in stem or os.sep in stem:
        return value
    places = [root / phase / f"{stem}.yaml"] if phase else []
    if phase and phase != "pretrain":
        places.append(root / "demo" / f"{phase}_{stem}.yaml")
    places.append(root / "demo" / f"{stem}.yaml")
    for candidate in places:
        if candidate.is_file():
            return str(candidate)
    matches = sorted(root.rglob(f"{stem}.yaml"))
    return str(matches[0]) if len(matches) == 1 else value


def with_config_found(argv, phase=None):
    """``argv`` with the value of ``--config``/``-c`` replaced by :func:`find_config`'s path."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        for flag in ("--config", "-c"):
            if arg == flag and i + 1 < len(argv):
                argv[i + 1] = find_config(argv[i + 1], phase)
            elif arg.startswith(flag + "=") and flag == "--config":
                argv[i] = flag + "=" + find_config(arg[len(flag) + 1:], phase)
    return argv


__all__ = ["BUNDLED", "MissingResourceError", "config_dir", "demo_data_path", "find_config",
           "resource_root", "with_config_found"]
