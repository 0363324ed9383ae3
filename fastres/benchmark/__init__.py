"""Benchmark harness shared by `python -m fastres bench`, `python -m fastres profile` and `bench/`
(the whole of it in case.py for now; the next commit splits it by job)."""

from .case import *  # noqa: F403
