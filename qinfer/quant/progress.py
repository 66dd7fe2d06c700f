"""Progress of a quantization run: one bar per layer (qinfer/progress.py, tqdm) with
the time left for the layer and, once a layer is done, for the whole run."""
import sys
import time

from ..progress import bar, is_terminal

BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"


def _clock(seconds):
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    def __init__(self, n_layers, enabled=True, file=None):
        self.n_layers = n_layers
        self.enabled = enabled
        self.file = file if file is not None else sys.stderr
        self.start = time.perf_counter()
        self.done_layers = 0
        self.layer_seconds = []

    def run_left(self):
        """Seconds left in the run: an average layer for each layer not done yet (the current one
        included); None before a layer has finished."""
        if not self.layer_seconds:
            return None
        per_layer = sum(self.layer_seconds) / len(self.layer_seconds)
        return per_layer * (self.n_layers - self.done_layers)

    def layer(self, index, steps):
        return _LayerBar(self, index, steps)


class _LayerBar:
    def __init__(self, progress, index, steps):
        self.p = progress
        self.index = index
        self.steps = steps
        self.bar = None

    def __enter__(self):
        self.t0 = time.perf_counter()
        p = self.p
        # On a terminal the bar redraws twice a second; into a file or pipe a line every 5 s.
        self.bar = bar(self.steps, f"layer {self.index + 1}/{p.n_layers}", "step", bool(p.enabled), p.file,
                       leave=True, mininterval=0.5 if is_terminal(p.file) else 5.0, bar_format=BAR_FORMAT)
        left = p.run_left()
        if left is not None:
            self.bar.set_postfix_str(f"run ~{_clock(left)} left", refresh=False)
        return self

    def update(self, n=1):
        self.bar.update(n)

    def __exit__(self, *exc):
        p = self.p
        if exc[0] is None:
            p.done_layers += 1
            p.layer_seconds.append(time.perf_counter() - self.t0)
        self.bar.close()
        return False
