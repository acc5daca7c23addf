"""Packaging only (the metadata is in pyproject.toml): ship the top-level ``conf/`` inside built wheels.

The configs stay where the project keeps them (``conf/``, one source of truth); ``build_py`` copies them into the
wheel as ``ganlab/conf``, which :func:`ganlab.paths.conf_dir` reads when no checkout is around. An editable install
imports from ``src/`` and reads ``conf/`` directly, so nothing is copied then.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildWithConf(build_py):
    def run(self) -> None:
        super().run()
        if not getattr(self, "editable_mode", False):
            target = Path(self.build_lib) / "ganlab" / "conf"
            shutil.copytree(HERE / "conf", target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))


setup(cmdclass={"build_py": BuildWithConf})
