"""llama.cpp as a reference: built from the llama-cpp-python sdist, outside the repo.

The benchmark scripts compare qinfer with llama.cpp on the same machine in the
same run. This module gets llama.cpp the way a user without a hub would: the
llama-cpp-python source distribution from the package registry (it vendors
llama.cpp), built once with cmake into a cache folder, and reused while its
stamp file matches the version and flags. It also writes the F32 GGUF both engines start
from, so every comparison model comes from the same float weights.

    python benchmarks/llamacpp.py [--isa avx2]   # build (or find) the tools and print their paths

The instruction set: "native" (the default) builds for this CPU as llama.cpp
does by default (GGML_NATIVE: AVX-512 and VNNI where the CPU has them);
"avx2" builds with AVX2, FMA and F16C only, the instruction set of the
machines the targets were set on, so on an AVX-512 CPU the two engines can
also be compared like for like (qinfer with QINFER_AVX512=0 and
QINFER_INT8_ISA=avxvnni or avx2: its kernels then use no AVX-512 either).
Each has its own tools.
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

VERSION = "0.3.36"
TOOLS = ("llama-bench", "llama-perplexity", "llama-quantize", "llama-server")
# AMX off even in the native build: its tile registers need a permission from
# the kernel that virtual machines may not grant, and llama-bench died with
# SIGSEGV in ggml_backend_amx_mul_mat on a KVM Xeon that lists amx_tile. Explicit
# -mno-* flags win over -march=native in GCC and clang whatever their order.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
ISAS = {
    "native": ["-DGGML_NATIVE=ON", f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"],
    "avx2": ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
             "-DGGML_BMI2=ON", "-DGGML_AVX512=OFF", "-DGGML_AVX_VNNI=OFF"],
}


def cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "qinfer", f"llama.cpp-{VERSION}")


def _log(message):
    print(f"[llama.cpp] {message}", file=sys.stderr, flush=True)


def _download_sdist(dest):
    """The llama-cpp-python sdist from the registry (no build isolation when scikit-build-core is
    installed: then pip only reads the metadata; otherwise pip installs the build backend first)."""
    base = [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={VERSION}", "--no-deps",
            "--no-binary", ":all:", "-d", dest, "-q"]
    try:
        import scikit_build_core  # noqa: F401
        attempts = [base + ["--no-build-isolation"], base]
    except ImportError:
        attempts = [base]
    for cmd in attempts:
        if subprocess.run(cmd).returncode == 0:
            found = glob.glob(os.path.join(dest, "llama_cpp_python-*.tar.gz"))
            if found:
                return found[0]
    raise SystemExit("could not download the llama-cpp-python sdist with pip")


def _run(cmd, cwd=None):
    _log(" ".join(cmd))
    subprocess.run(cmd, cwd=cwd, check=True)


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def build(jobs=None, isa="native"):
    """Paths of the llama.cpp tools for instruction set `isa` (ISAS), building them on first use."""
    if isa not in ISAS:
        raise SystemExit(f"unknown llama.cpp instruction set {isa!r}; expected one of {sorted(ISAS)}")
    root = cache_dir()
    suffix = "" if isa == "native" else f"-{isa}"
    bindir = os.path.join(root, "bin" + suffix)
    stamp = os.path.join(root, "stamp" + suffix)
    paths = {t: os.path.join(bindir, t) for t in TOOLS}
    stamp_text = f"llama-cpp-python {VERSION} {isa} {' '.join(ISAS[isa])}\n"
    if _read(stamp) == stamp_text and all(os.access(p, os.X_OK) for p in paths.values()):
        return paths
    os.makedirs(root, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as work:
        _log(f"downloading llama-cpp-python {VERSION} (sdist)")
        sdist = _download_sdist(work)
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(work)
        src = glob.glob(os.path.join(work, "llama_cpp_python-*", "vendor", "llama.cpp"))[0]
        build_dir = os.path.join(work, "build")
        _run(["cmake", "-S", src, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release", *ISAS[isa],
              "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=ON",
              "-DBUILD_SHARED_LIBS=OFF"])
        _run(["cmake", "--build", build_dir, "--config", "Release", "-j", str(jobs or os.cpu_count() or 2),
              "--target", *TOOLS])
        os.makedirs(bindir, exist_ok=True)
        for tool, dest in paths.items():
            shutil.copy2(os.path.join(build_dir, "bin", tool), dest)
        with open(stamp, "w") as f:
            f.write(stamp_text)
    return paths


def write_f32_gguf(src, dest):
    """Write `src` (any GGUF the gguf package reads) with every tensor as F32.

    The metadata is copied key by key; quantized tensors are dequantized with
    gguf's own reference code, so llama.cpp and qinfer start from the same floats.
    Written to a temporary name and renamed when whole.
    """
    import numpy as np
    import gguf

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"]
    arch = bytes(arch.parts[arch.data[0]]).decode()
    tmp = dest + ".tmp"
    writer = gguf.GGUFWriter(tmp, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = field.types[1]
            if sub == gguf.GGUFValueType.STRING:
                value = [bytes(field.parts[i]) for i in field.data]
            else:
                value = [field.parts[i][0].item() for i in field.data]
            writer.add_array(name, value)
        elif vtype == gguf.GGUFValueType.STRING:
            writer.add_string(name, bytes(field.parts[field.data[0]]).decode())
        else:
            writer.add_key_value(name, field.parts[field.data[0]][0].item(), vtype)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = tuple(int(d) for d in reversed(t.shape))   # GGUF lists dims fastest-first
        writer.add_tensor(t.name, data.reshape(shape), raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, dest)
    return dest


def quantize(tools, f32_gguf, dest, qtype, threads=2):
    """llama-quantize `f32_gguf` to `qtype` (Q4_0, Q8_0, Q4_K_M, ...) at `dest`, unless it exists."""
    if not os.path.exists(dest):
        tmp = dest + ".tmp"
        subprocess.run([tools["llama-quantize"], f32_gguf, tmp, qtype, str(threads)], check=True,
                       stdout=subprocess.DEVNULL)
        os.replace(tmp, dest)
    return dest


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-j", "--jobs", type=int, default=None)
    p.add_argument("--isa", choices=sorted(ISAS), default="native",
                   help="instruction set of the build (default: native, this CPU's)")
    args = p.parse_args()
    for tool, path in build(args.jobs, args.isa).items():
        print(f"{tool}: {path}")
