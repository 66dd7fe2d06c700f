"""A GPTQ checkpoint directory (AutoGPTQ / GPTQModel / qinfer.quantize) -> ModelSource.

Recognized by config.json["quantization_config"]["quant_method"] == "gptq"
or by a quantize_config.json (readers/__init__.py's load_hf routes here). Settings read:

    bits               2, 3, 4 or 8
    group_size         any positive size, or -1 (the kernels run groups that
                       split into runs of 16/32/64/128 rows: quant/layout.py)
    checkpoint_format  "gptq" (v1: qzeros hold zero - 1; the default when the
                       key is absent, as in AutoGPTQ) or "gptq_v2" (the zero
                       itself); GPTQModel's older key "format" is read too.
                       "qinfer_float_zero" (qinfer.quantize, zero_point
                       "float"): `.zeros` float16 instead of `.qzeros`.
                       Anything else is refused, never guessed.
    dynamic            GPTQModel's per-layer rules (quant/dynamic.py): other bits
                       or group_size for the layers a rule matches, or float
    input_activations  W8A8 / W4A8 (qinfer.quantize's smoothquant and zeroquant
                       methods): {"num_bits": 8, "type": "int", "symmetric": true,
                       "dynamic": true, "strategy": "token"}, the linear layers'
                       inputs rounded to int8 per token at run time; the weights
                       must then be 8- or 4-bit symmetric (every zero point
                       2^(bits-1)), rows in order. Any other setting is refused.
    lorc_rank          with input_activations: every quantized layer also holds
                       `.lorc_a` [rank, in] and `.lorc_b` [out, rank] (float), the
                       factors of a low-rank compensation y += B (A x) (LoRC,
                       quant/lorc.py)
    desc_act, sym      informational: g_idx and qzeros say what they imply

Both files may be present (transformers writes the first, AutoGPTQ the
second); where both give a setting they must agree.

Per linear layer (docs/FORMAT.md, section 4): `.qweight` int32, `.qzeros`
int32, `.scales` (float16 usually), `.g_idx` int32 (optional: without it
rows are in order). A weight stored as plain `.weight` instead stays float
(e.g. an unquantized lm_head). A `.bias` must be all zeros (LLaMA has none).
"""
import math
import os

import numpy as np

from ..errors import FormatError, UnsupportedError
from ..packing import GPTQ_BITWIDTHS as BITWIDTHS
from ..quant import dynamic, layout
from . import validate
from .hf import INDEX, SINGLE, generation_eos, model_source, shard_of, weight_files
from .hf_config import model_config
from .jsonfile import read_json
from .safetensors import read_safetensors
from .settings_files import QUANTIZE_CONFIG, merged_settings
from .source import PackedTensor

def is_gptq(directory, cfg):
    """Whether load_hf (readers/__init__.py) should hand this directory to load_gptq."""
    quant = cfg.get("quantization_config")
    if isinstance(quant, dict):
        return quant.get("quant_method") == "gptq"
    return quant is None and os.path.isfile(os.path.join(directory, QUANTIZE_CONFIG))


def _settings(directory, cfg, config_path):
    """{"bits", "group_size", "checkpoint_format"} from config.json and/or quantize_config.json."""
    merged = merged_settings(directory, cfg, config_path, _read_settings, ("bits", "group_size"))
    merged.setdefault("checkpoint_format", "gptq")
    return merged


def _read_settings(entries, where):
    method = entries.get("quant_method", "gptq")
    if method != "gptq":
        raise UnsupportedError(f"{where}: quant_method {method!r} is not supported (qinfer reads GPTQ checkpoints)")
    if entries.get("is_marlin_format"):
        raise UnsupportedError(f"{where}: Marlin-format GPTQ checkpoints are not supported")
    for key in ("desc_act", "sym", "static_groups", "true_sequential"):
        if entries.get(key) is not None and not isinstance(entries[key], bool):
            raise FormatError(f"{where}: {key!r} must be true or false, got {entries[key]!r}"[:200])
    pack_dtype = entries.get("pack_dtype", "int32")
    if pack_dtype not in ("int32", "torch.int32"):
        raise UnsupportedError(f"{where}: pack_dtype {pack_dtype!r} is not supported (qinfer reads int32 words)")
    out = {}
    if "bits" in entries:
        bits = entries["bits"]
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITWIDTHS:
            raise UnsupportedError(f"{where}: bits {bits!r} is not supported (supported: {BITWIDTHS})")
        out["bits"] = bits
    if "group_size" in entries:
        g = entries["group_size"]
        if isinstance(g, bool) or not isinstance(g, int) or not (g == -1 or g > 0):
            raise FormatError(f"{where}: group_size must be a positive integer or -1, got {g!r}")
        out["group_size"] = g
    for k in ("checkpoint_format", "format"):
        if entries.get(k) is not None and not isinstance(entries[k], str):
            raise FormatError(f"{where}: {k!r} must be a string such as \"gptq\" or \"gptq_v2\", "
                              f"got {type(entries[k]).__name__} {entries[k]!r}"[:200])
    formats = {entries[k] for k in ("checkpoint_format", "format") if entries.get(k) is not None}
    if len(formats) > 1:
        raise FormatError(f"{where}: 'checkpoint_format' and 'format' disagree ({sorted(formats)})")
    if formats:
        out["checkpoint_format"] = layout.check_format(formats.pop(), where)
    if entries.get("dynamic"):
        out["dynamic"] = dynamic.Rules(entries["dynamic"], where).to_json()
    if entries.get("input_activations") is not None:
        out["input_activations"] = _input_activations(entries["input_activations"], where)
    if entries.get("lorc_rank") is not None:
        r = entries["lorc_rank"]
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise FormatError(f"{where}: 'lorc_rank' must be a positive integer, got {r!r}"[:200])
        out["lorc_rank"] = r
    return out


# The one activation quantization qinfer runs (qinfer/int8_linear.py): int8 per token, symmetric, at run time
PER_TOKEN_INT8 = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True, "strategy": "token"}


def _check_int8_activation_bits(bits, rules, where):
    """With input_activations every layer is 8- or 4-bit (the int8-activation kernels'), none
    left float by a negative 'dynamic' rule."""
    widths = [(bits, "the checkpoint's bits")]
    for key, _, positive, overrides in rules.rules:
        if not positive:
            raise UnsupportedError(f"{where}: input_activations (int8 per token) with the 'dynamic' rule {key!r}, "
                                   f"which leaves layers float: every linear layer must be quantized")
        widths.append((overrides.get("bits", bits), f"the 'dynamic' rule {key!r}"))
    for b, what in widths:
        if b not in (8, 4):
            raise UnsupportedError(f"{where}: input_activations (int8 per token) need 8- or 4-bit weights; "
                                   f"{what} gives {b} bits")


def _input_activations(entry, where):
    """"int8-token" for PER_TOKEN_INT8; an UnsupportedError naming the first setting that differs."""
    if not isinstance(entry, dict):
        raise FormatError(f"{where}: 'input_activations' must be an object, got {entry!r}"[:200])
    for key in entry:
        if key not in PER_TOKEN_INT8:
            raise UnsupportedError(f"{where}: input_activations.{key} is not supported (qinfer runs "
                                   f"{PER_TOKEN_INT8})"[:300])
    for key, want in PER_TOKEN_INT8.items():
        if entry.get(key) != want or isinstance(entry.get(key), bool) != isinstance(want, bool):
            raise UnsupportedError(f"{where}: input_activations.{key} = {entry.get(key)!r} is not supported "
                                   f"(qinfer runs activations as {key} = {want!r})"[:300])
    return "int8-token"


def _weight_source(directory, settings):
    """({file: SafetensorsFile}, {tensor: file}): model.safetensors / its index, or AutoGPTQ's own name."""
    if os.path.isfile(os.path.join(directory, SINGLE)) or os.path.isfile(os.path.join(directory, INDEX)):
        return weight_files(directory)
    qc_path = os.path.join(directory, QUANTIZE_CONFIG)
    names = []
    if os.path.isfile(qc_path):
        base = read_json(qc_path).get("model_file_base_name")
        if isinstance(base, str) and base and os.path.basename(base) == base:
            names.append(base + ".safetensors")
    names.append(f"gptq_model-{settings['bits']}bit-{settings['group_size']}g.safetensors")
    found = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
    for name in names:
        if name in found:
            break
    else:
        if len(found) != 1:
            raise FormatError(f"{directory}: no {SINGLE}, {INDEX} or {names[0]}"
                              + (f" (and several other .safetensors files: {found})" if found else ""))
        name = found[0]
    f = read_safetensors(os.path.join(directory, name))
    return {name: f}, {t: name for t in f.tensors}


def load_gptq(directory, cfg, config_path):
    directory = os.fspath(directory)
    settings = _settings(directory, cfg, config_path)
    plain = {k: v for k, v in cfg.items() if k != "quantization_config"}
    config = model_config(plain, config_path, extra_eos=generation_eos(directory))
    validate.check_config(config, config_path)

    shards, owner = _weight_source(directory, settings)

    def get(name):
        return shard_of(shards, owner, name)

    rules = dynamic.Rules(settings.get("dynamic"), directory)
    activations = settings.get("input_activations")
    if activations:
        _check_int8_activation_bits(settings["bits"], rules, directory)
    lorc_rank = settings.get("lorc_rank")
    if lorc_rank and not activations:
        raise UnsupportedError(f"{directory}: lorc_rank (a low-rank compensation) is supported in W8A8/W4A8 "
                               f"checkpoints (with input_activations) only")
    tensors = {}
    for name, shape in validate.expected_shapes(config).items():
        base = name[:-len(".weight")]
        if base + ".qweight" in owner:
            if name in owner:
                raise FormatError(f"{directory}: {base} is stored twice, as {base}.qweight (quantized) and as "
                                  f"{name} (float); qinfer does not guess which one is the layer")
            if len(shape) != 2:
                raise FormatError(f"{directory}: {base} is quantized but is not a matrix")
            layer_settings = rules.resolve(base, settings)
            if layer_settings is dynamic.SKIP:
                raise FormatError(f"{directory}: {base} holds a .qweight but a negative 'dynamic' rule says "
                                  f"it is not quantized")
            tensors[name] = _packed(base, shape, layer_settings, get, owner, directory)
            if lorc_rank:
                where = f"low-rank compensation of rank {lorc_rank}, layer {list(shape)}"
                tensors[name].low_rank = tuple(
                    np.ascontiguousarray(_float_tensor(base + part, get, owner, want, where, directory),
                                         dtype=np.float32)
                    for part, want in ((".lorc_a", (lorc_rank, shape[1])), (".lorc_b", (shape[0], lorc_rank))))
        elif name in owner:
            shard, t = get(name)
            if shard.dtypes[name] not in ("F32", "F16", "BF16"):
                raise FormatError(f"{shard.path}: tensor {name!r} has dtype {shard.dtypes[name]}, expected a "
                                  f"float type (F32, F16, BF16)")
            tensors[name] = t
        else:
            raise FormatError(f"{directory}: tensor {name!r} is missing from the checkpoint "
                              f"(neither {base}.qweight nor {name})")
        _check_bias(base, get, owner)
    validate.check_tensors(config, tensors, directory)
    validate.check_no_extra_layers(config, owner, directory)
    source = model_source(directory, "gptq", config, tensors, shards)
    source.activations = activations
    return source


def _check_bias(base, get, owner):
    name = base + ".bias"
    if name not in owner:
        return
    shard, t = get(name)
    values = np.asarray(t() if callable(t) else t)
    if values.dtype.kind != "f" or np.any(values != 0):
        raise UnsupportedError(f"{shard.path}: {name} is not all zeros; qinfer's LLaMA has no biases")


def _int_tensor(name, get, shape, where, dtypes=("I32",)):
    shard, t = get(name)
    if shard.dtypes[name] not in dtypes:
        raise FormatError(f"{shard.path}: {name} has dtype {shard.dtypes[name]}, expected I32")
    if tuple(t.shape) != shape:
        raise FormatError(f"{shard.path}: {name} has shape {list(t.shape)}, expected {list(shape)} ({where})")
    return t


def _float_tensor(name, get, owner, shape, where, directory):
    """Per-group scales or float zero points: float16 (or float32/bfloat16), finite."""
    if name not in owner:
        raise FormatError(f"{directory}: {name} is missing")
    shard, t = get(name)
    if shard.dtypes[name] not in ("F16", "F32", "BF16"):
        raise FormatError(f"{shard.path}: {name} has dtype {shard.dtypes[name]}, expected F16")
    if tuple(t.shape) != shape:
        raise FormatError(f"{shard.path}: {name} has shape {list(t.shape)}, expected {list(shape)} ({where})")
    values = np.asarray(t() if callable(t) else t, dtype=np.float32)
    if not np.all(np.isfinite(values)):
        raise FormatError(f"{shard.path}: {name} holds NaN or infinity")
    return values


def _check_g_idx_groups(g_idx, groups, in_features, group_size, where):
    """Each quantization group holds group_size input rows (the last may hold fewer), whatever the order
    (act-order permutes rows, not group sizes): a g_idx made for another group_size disagrees."""
    if g_idx.size == 0 or g_idx.min() < 0 or g_idx.max() >= groups:
        return                                   # layout.kernel_layout names this problem
    size = in_features if group_size == -1 else group_size
    want = np.full(groups, size)
    want[-1] = in_features - size * (groups - 1)
    counts = np.bincount(g_idx.astype(np.int64), minlength=groups)
    if not np.array_equal(counts, want):
        bad = int(np.flatnonzero(counts != want)[0])
        raise FormatError(f"{where}: group {bad} holds {int(counts[bad])} input rows but group_size "
                          f"{group_size} means {int(want[bad])}; the g_idx disagrees with the group size")


def _packed(base, shape, settings, get, owner, directory):
    bits, group_size, fmt = settings["bits"], settings["group_size"], settings["checkpoint_format"]
    out_features, in_features = shape
    where = f"{bits}-bit, group_size {group_size}, layer [{out_features}, {in_features}]"
    if in_features % 32:
        raise UnsupportedError(f"{directory}: {base} has {in_features} inputs, not a multiple of 32 "
                               f"(the packing unit qinfer's kernels need)")
    groups = layout.n_groups(in_features, group_size)
    qweight = _int_tensor(base + ".qweight", get, (math.ceil(in_features * bits / 32), out_features), where)
    scales = _float_tensor(base + ".scales", get, owner, (groups, out_features), where, directory)

    if fmt == layout.FLOAT_ZERO_FORMAT:
        zeros = _float_tensor(base + ".zeros", get, owner, (groups, out_features), where, directory)
    else:
        if base + ".qzeros" not in owner:
            raise FormatError(f"{directory}: {base}.qzeros is missing (next to {base}.qweight)")
        qzeros = _int_tensor(base + ".qzeros", get, (groups, layout.qzeros_words(out_features, bits)), where)
        zeros = layout.decode_zeros(layout.unpack_rows(np.asarray(qzeros), bits, out_features), bits, fmt)
    g_idx = None
    if base + ".g_idx" in owner:
        g_idx = np.asarray(_int_tensor(base + ".g_idx", get, (in_features,), where, ("I32", "I64")))
        _check_g_idx_groups(g_idx, groups, in_features, group_size, f"{directory}: {base}.g_idx ({where})")
    group, scales, zeros, g_idx = layout.kernel_layout(scales, zeros, g_idx, in_features, group_size,
                                                       where=f"{directory}: {base}")
    return PackedTensor(bits=bits, group_size=group, qweight=np.asarray(qweight), scales=scales, zeros=zeros,
                        g_idx=g_idx, shape=shape)
