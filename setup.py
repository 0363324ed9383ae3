"""Builds fastres.

The Triton kernels live in the top-level folder `kernels/` of the repository but are installed
as `fastres.kernels` (a top-level package named `kernels` exists on PyPI), both for a regular
and an editable install.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["fastres", "fastres.*"]) + ["fastres.kernels"]

setup(
    packages=packages,
    package_dir={"fastres.kernels": "kernels"},
)
