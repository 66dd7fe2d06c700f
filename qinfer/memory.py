"""How much memory the machine can give, for checks made before a large allocation.

The KV cache is allocated whole when a model loads, but with calloc: its
pages are mapped, not touched, so resident memory grows with the tokens a
sequence actually holds. A context whose cache could never be filled would
then fail late, the kernel killing the process mid-generation when the pages
run out; Model checks the full cache against available_bytes() at load
instead (model.check_cache_fits).
"""
MEMINFO = "/proc/meminfo"


def available_bytes(path=MEMINFO):
    """Bytes the machine can give a new allocation: MemAvailable + SwapFree from /proc/meminfo
    (Linux), or None where that is unknown (no such file, or neither field in it)."""
    fields = {}
    try:
        with open(path) as f:
            for line in f:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if name in ("MemAvailable", "SwapFree") and parts:
                    fields[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except (OSError, ValueError):
        return None
    if "MemAvailable" not in fields:
        return None
    return fields["MemAvailable"] + fields.get("SwapFree", 0)


def format_bytes(n):
    """n bytes in the largest binary unit it reaches, e.g. "5.6 GiB", "360.0 MiB", "512 B"."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"
