"""Test-wide settings.

QINFER_TUNE=0: no test run spends time tuning kernels or reads the user's
tuning cache, so every layer runs the performance model's parameters and
results do not depend on the machine's cache. Tests of the tuner turn it on
for themselves (tests/test_tune.py). Set before any test imports qinfer, and
inherited by the subprocesses the CLI tests start.
"""
import os

os.environ["QINFER_TUNE"] = "0"
