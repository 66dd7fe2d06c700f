"""What the generator needs to know about the CPU: cache sizes and SIMD flags.

Read from Linux sysfs and /proc/cpuinfo; anything unreadable falls back to a
conservative default so the build never fails because of an unusual machine.
"""
import os
import platform
from dataclasses import dataclass, asdict

DEFAULT_L1D = 32 * 1024
DEFAULT_L2 = 256 * 1024
DEFAULT_L3 = 8 * 1024 * 1024
SYSFS_CACHE = "/sys/devices/system/cpu/cpu0/cache"


@dataclass(frozen=True)
class Machine:
    cpu_model: str
    l1d_bytes: int
    l2_bytes: int
    l3_bytes: int
    cache_source: str          # "sysfs" or "default"
    vector_registers: int      # YMM registers visible to the compiler
    avx2: bool
    fma: bool
    vendor: str = ""           # /proc/cpuinfo's vendor_id: "GenuineIntel", "AuthenticAMD", ...

    def as_dict(self):
        return asdict(self)


def _parse_size(text):
    text = text.strip().upper()
    units = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}
    if text and text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


def read_caches(sysfs=SYSFS_CACHE):
    """Return ({level: bytes} for data/unified caches, source)."""
    sizes = {}
    try:
        for entry in sorted(os.listdir(sysfs)):
            if not entry.startswith("index"):
                continue
            path = os.path.join(sysfs, entry)
            with open(os.path.join(path, "type")) as f:
                kind = f.read().strip()
            if kind == "Instruction":
                continue
            with open(os.path.join(path, "level")) as f:
                level = int(f.read())
            with open(os.path.join(path, "size")) as f:
                sizes[level] = _parse_size(f.read())
    except (OSError, ValueError):
        return {}, "default"
    return sizes, ("sysfs" if sizes else "default")


def read_cpuinfo(path="/proc/cpuinfo"):
    """Return (model name, set of flags, vendor id) of the first CPU listed."""
    model, flags, vendor = platform.processor() or platform.machine(), set(), ""
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine()):
                    model = value.strip()
                elif key == "vendor_id" and not vendor:
                    vendor = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return model, flags, vendor


def detect():
    sizes, source = read_caches()
    model, flags, vendor = read_cpuinfo()
    return Machine(
        cpu_model=model,
        l1d_bytes=sizes.get(1, DEFAULT_L1D),
        l2_bytes=sizes.get(2, DEFAULT_L2),
        l3_bytes=sizes.get(3, DEFAULT_L3),
        cache_source=source,
        vector_registers=16,   # AVX2 has 16 YMM registers (AVX-512's 32 are not used)
        avx2="avx2" in flags,
        fma="fma" in flags,
        vendor=vendor,
    )
