"""What a user installing ffkern relies on: the license the metadata names exists, and the
ahead-of-time build without torch says what to do instead of "No module named 'torch'"."""
import os
import subprocess
import sys

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_license_file_is_the_metadata_license():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["license"] == {"file": "LICENSE"} and project["authors"]
    text = open(os.path.join(REPO, "LICENSE")).read()
    assert text.startswith("MIT License") and "WITHOUT WARRANTY OF ANY KIND" in text


def test_build_ext_without_torch_gives_advice(tmp_path):
    # a build environment where torch cannot be imported (as in pip's isolated build)
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    env = dict(os.environ, FFKERN_BUILD_EXT="1", PYTHONPATH=str(tmp_path))
    run = subprocess.run([sys.executable, "setup.py", "--name"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode != 0
    assert "Install torch first, then build without isolation" in run.stderr and "--no-build-isolation" in run.stderr
