"""Packaging: the Triton sources in kernels/ are installed as ``ffkern.kernels`` (never as a
top-level ``kernels`` module)."""
from setuptools import setup

setup(
    packages=["ffkern", "ffkern.kernels"],
    package_dir={"ffkern": "ffkern", "ffkern.kernels": "kernels"},
)
