"""The variant table, qinfer/variants.py, for the generator.

Loaded by its path, not imported as qinfer.variants: that would run
qinfer/__init__.py, which loads the extension modules this build is about
to make. The package imports the same file as qinfer.variants at run time.
"""
import importlib.util
import os

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "qinfer", "variants.py")


def _load():
    spec = importlib.util.spec_from_file_location("qinfer_variants_table", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


table = _load()
