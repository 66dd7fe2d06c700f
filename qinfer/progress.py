"""Progress bars on stderr, all of them tqdm's: `qinfer quantize`'s one per layer
(quant/progress.py) and `qinfer perplexity`'s windows (perplexity.py)."""
import sys

from tqdm import tqdm


def is_terminal(file):
    return bool(getattr(file, "isatty", lambda: False)())


def bar(total, desc, unit, enabled=None, file=None, **options):
    """A tqdm bar of `total` steps on `file` (stderr). enabled None: only when `file` is a
    terminal; False: a bar that shows nothing. options: tqdm's (leave, bar_format, ...)."""
    file = sys.stderr if file is None else file
    if enabled is None:
        enabled = is_terminal(file)
    return tqdm(total=total, desc=desc, unit=unit, file=file, disable=not enabled, dynamic_ncols=True,
                **options)
