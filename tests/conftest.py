"""Test-wide settings.

QINFER_TUNE=0: no test run spends time tuning kernels or reads the user's
tuning cache, so every layer runs the performance model's parameters and
results do not depend on the machine's cache. Tests of the tuner turn it on
for themselves (tests/test_tune.py). Set before any test imports qinfer, and
inherited by the subprocesses the CLI tests start.
"""
import os

os.environ["QINFER_TUNE"] = "0"
# The thread governor (pyx/team.h) may run a 2-thread step on 1 thread when that is
# faster; the results are the same bit for bit, but a test of the decode team must
# run the team it asks for. tests/test_threads.py turns the governor on for itself.
os.environ["QINFER_ADAPT_THREADS"] = "0"
