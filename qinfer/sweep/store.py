"""The sweep's results cache: one JSON file of {key: row}, rewritten whole after each result.

Each write goes to a temporary file that replaces the old one when complete, so an
interrupted sweep leaves the results it had, and the next run resumes from them.
"""
import json
import os

from .grid import GridError


class Store:
    def __init__(self, path, fresh=False):
        self.path = os.fspath(path)
        self.data = {}
        if os.path.exists(self.path) and not fresh:
            try:
                with open(self.path, encoding="utf-8") as f:
                    self.data = json.load(f)
            except (OSError, ValueError) as e:
                raise GridError(f"{self.path}: the sweep's results cache cannot be read ({e}); move it away or "
                                f"run with --fresh") from None
            if not isinstance(self.data, dict):
                raise GridError(f"{self.path}: the sweep's results cache is not a JSON object")

    def get(self, key):
        return self.data.get(key)

    def put(self, key, row):
        self.data[key] = row
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.data, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)
        return row
