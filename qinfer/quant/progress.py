"""Progress of a quantization run: one bar per layer with the time left for the
layer and, once a layer is done, for the whole run (tqdm when installed, else
a plain line on stderr)."""
import sys
import time


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
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        self._tqdm = tqdm

    def run_left(self, layer_left=None):
        """Seconds left in the run: the current layer's estimate (default: an average layer) plus
        an average layer for each one after it; None before a layer has finished."""
        if not self.layer_seconds:
            return None
        per_layer = sum(self.layer_seconds) / len(self.layer_seconds)
        current = per_layer if layer_left is None else layer_left
        return current + per_layer * (self.n_layers - self.done_layers - 1)

    def layer(self, index, steps):
        return _LayerBar(self, index, steps)


class _LayerBar:
    def __init__(self, progress, index, steps):
        self.p = progress
        self.index = index
        self.steps = steps
        self.count = 0
        self.bar = None
        self._last = 0.0

    def __enter__(self):
        self.t0 = time.perf_counter()
        p = self.p
        if not p.enabled:
            return self
        desc = f"layer {self.index + 1}/{p.n_layers}"
        if p._tqdm is not None:
            left = p.run_left()
            self.bar = p._tqdm(total=self.steps, desc=desc, unit="step", file=p.file, leave=True,
                               dynamic_ncols=True, mininterval=0.5 if p.file.isatty() else 5.0,
                               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                          "[{elapsed}<{remaining}{postfix}]")
            if left is not None:
                self.bar.set_postfix_str(f"run ~{_clock(left)} left", refresh=False)
        return self

    def update(self, n=1):
        self.count += n
        p = self.p
        if not p.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last < 1.0 and self.count < self.steps:
            return
        self._last = now
        elapsed = now - self.t0
        left = elapsed / self.count * (self.steps - self.count) if self.count else 0.0
        total = p.run_left(left)
        run = f", run ~{_clock(total)} left" if total is not None else ""
        end = "\r" if p.file.isatty() else "\n"
        p.file.write(f"layer {self.index + 1}/{p.n_layers}: {100 * self.count // self.steps:3d}% "
                     f"[{_clock(elapsed)} elapsed, {_clock(left)} left{run}]{end}")
        p.file.flush()

    def __exit__(self, *exc):
        p = self.p
        seconds = time.perf_counter() - self.t0
        if exc[0] is None:
            p.done_layers += 1
            p.layer_seconds.append(seconds)
        if self.bar is not None:
            self.bar.close()
        elif p.enabled and exc[0] is None and p.file.isatty():
            p.file.write("\n")
            p.file.flush()
        return False
