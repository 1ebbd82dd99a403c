"""Build hook (the project's metadata is in pyproject.toml): the installed package carries the
demo digits, the demo tokenizer and the recipe files (``configs/``) in ``paddle_cae/_bundled/``,
so that the installed commands run their demos, and find recipes by name, from any folder. In a
checkout and in an editable install they are read where they are (``paddle_cae/resources.py``)."""
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
BUNDLED = ("demo/digits", "demo/tokenizer", "configs")


class BuildPyWithDemo(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the checkout itself
        target = os.path.join(self.build_lib, "paddle_cae", "_bundled")
        for folder in BUNDLED:
            shutil.copytree(os.path.join(HERE, folder), os.path.join(target, folder),
                            dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildPyWithDemo})
