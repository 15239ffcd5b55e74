"""Write a causal LM as one GGUF file that llama.cpp (and Ollama, and transformers' `gguf_file=`) runs.

Architectures: Llama, Mistral (llama.cpp writes both as `llama`) and Qwen2. Names, metadata keys and tensor
layouts follow llama.cpp's own converter (convert_hf_to_gguf.py: `TextModel.set_gguf_parameters`,
`LlamaModel`, `Qwen2Model`, `_set_vocab_gpt2`), written with the `gguf` package's `GGUFWriter`.

- Full-precision tensors go out at `gguf_type` (f16 / bf16 / f32 / q8_0); 1-D tensors and norms in f32, as
  the converter does.
- `quantized` matrices (our INT4 group-32 QuantizedTensors, e.g. a merged QA-LoRA model) are written as ggml
  Q4_1 bit for bit: a block of 32 consecutive weights of a row holds d (fp16), m (fp16) and
  qs[j] = q[j] | q[j + 16] << 4, value = d * q + m, which is our value = scale * code + zero per group of 32.
  Anything Q4_1 cannot hold exactly is a ValueError naming the module.
- Llama / Mistral q_proj and k_proj rows are permuted as the converter's `LlamaModel.permute` does (llama.cpp
  applies RoPE to interleaved pairs); a permutation of whole rows keeps Q4_1 blocks intact.
- Tokenizer: BPE (gpt2-style) only, written as the converter writes it (workers/gguf_vocab.py).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from workers.gguf_vocab import Vocab, bpe_vocab, write_vocab
from workers.quant import QuantizedTensor

# model_type -> (llama.cpp architecture name, whether q/k rows are permuted for llama.cpp's RoPE)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
Q4_1_BLOCK = 32

# metadata keys a caller may set although the exporter writes them too; any other key the exporter owns
# (architecture hyperparameters, the vocabulary, file type) would contradict the tensors
OVERRIDABLE_KEYS = ("general.name", "general.size_label", "tokenizer.ggml.pre", "tokenizer.chat_template")
_OWNED_KEYS = ("general.architecture", "general.type", "general.file_type", "general.quantization_version")
# HF buffers that are no weights (the converter skips them too)
_SKIPPED_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")


def _gguf():
    try:
        import gguf
    except ImportError as e:  # an optional extra: say how to get it rather than a bare ImportError
        raise ImportError("GGUF export needs the gguf package: pip install 'loftune[gguf]' (gguf==0.19.0)") from e
    return gguf


@dataclass
class _Planned:
    """One tensor as it will be written: GGUF name, data (numpy) and ggml type."""

    name: str
    data: np.ndarray
    qtype: object  # gguf.GGMLQuantizationType


# ------------------------------------------------------------------------------------------ public API


def write_gguf(path: str, *, config: dict, tensors: dict[str, torch.Tensor], tokenizer_dir: str,
               quantized: dict[str, QuantizedTensor] | None = None, gguf_type: str = "f16",
               metadata: dict[str, str] | None = None) -> str:
    """Write the model as a GGUF file at `path` (atomically: a temporary name renamed into place); returns `path`.

    `config` is the HF config.json dict; `tensors` the full-precision HF state dict (HF names);
    `quantized` maps HF module names (e.g. "model.layers.0.self_attn.q_proj") to INT4 group-32
    QuantizedTensors written as Q4_1 exactly (their float weight in `tensors`, if any, is ignored);
    everything else 2-D goes out at `gguf_type`. `metadata` adds string keys (e.g. general.license,
    loftune.base_key) or overrides general.name, general.size_label, tokenizer.ggml.pre (needed for a
    BPE pre-tokenizer the exporter does not recognise) and tokenizer.chat_template.
    Raises ValueError, before anything is written, for input the GGUF cannot represent.
    """
    gguf = _gguf()
    quantized = dict(quantized or {})
    metadata = _checked_metadata(metadata)
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type: expected one of {list(GGUF_TYPES)}, got {gguf_type!r}")
    arch, permute = _architecture(config)
    hp = _hparams(config)
    for module, q in quantized.items():
        _check_q4_1(module, q, tensors.get(f"{module}.weight"))
    vocab = bpe_vocab(gguf, tokenizer_dir, config, arch, metadata)
    planned = _plan_tensors(gguf, arch, permute, hp, tensors, quantized, gguf_type)
    ftype = _file_type(gguf, gguf_type, bool(quantized))

    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        _write_file(gguf, tmp, arch, planned, config, hp, ftype, vocab, metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _write_file(gguf, path: str, arch: str, planned: list[_Planned], config: dict, hp: dict, ftype: int,
                vocab: Vocab, metadata: dict[str, str]) -> None:
    """Tensors, then the metadata (general, hyperparameters, vocabulary, the caller's strings), to `path`."""
    writer = gguf.GGUFWriter(path, arch)
    for t in planned:
        writer.add_tensor(t.name, t.data, raw_dtype=t.qtype)
    _write_general(gguf, writer, config, metadata)
    _write_hparams(gguf, writer, arch, hp, ftype)
    write_vocab(writer, vocab)
    for key, value in metadata.items():
        if key not in OVERRIDABLE_KEYS:
            writer.add_string(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def q4_1_blocks(q: QuantizedTensor) -> np.ndarray:
    """The ggml Q4_1 bytes of an INT4 group-32 matrix: uint8 [out, in / 32 * 20], rows in our row order.

    Per block: d = scale (fp16, little-endian), m = zero (fp16), then 16 bytes qs[j] = q[j] | q[j + 16] << 4
    (ggml's block_q4_1 and gguf.quants.Q4_1). Call `_check_q4_1` first: this does not check exactness.
    """
    out_f, in_f = q.shape
    nb = in_f // Q4_1_BLOCK
    # our 4-bit packing: byte k holds codes 2k (low nibble) and 2k + 1; unpacked here directly (the generic
    # unpack_codes is several times slower), then re-paired as ggml pairs them: j with j + 16
    packed = q.packed.reshape(out_f, nb, Q4_1_BLOCK // 2)
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).view(out_f, nb, 2, Q4_1_BLOCK // 2)
    qs = codes[:, :, 0] | (codes[:, :, 1] << 4)
    d = q.scales.to(torch.float16).contiguous().view(torch.uint8).view(out_f, nb, 2)
    m = q.zeros.to(torch.float16).contiguous().view(torch.uint8).view(out_f, nb, 2)
    return torch.cat([d, m, qs], dim=2).reshape(out_f, nb * 20).cpu().numpy()


def llama_permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order (convert_hf_to_gguf `LlamaModel.permute`): per head, the two rotary halves
    interleave. Works on any tensor whose first dimension is the output rows (weights, biases, Q4_1 blocks)."""
    out_f = rows.shape[0]
    return (rows.reshape(n_head, 2, out_f // n_head // 2, *rows.shape[1:])
            .swapaxes(1, 2).reshape(rows.shape))


# ------------------------------------------------------------------------------------------ validation


def _checked_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    """Metadata as given, after checking it only adds string keys the exporter does not own."""
    metadata = dict(metadata or {})
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"metadata: keys and values must be strings, got {key!r}: {value!r}")
        owned = key in _OWNED_KEYS or (key.startswith("tokenizer.") and key not in OVERRIDABLE_KEYS)
        if owned or key.split(".")[0] in {a for a, _ in ARCHITECTURES.values()}:
            raise ValueError(f"metadata: {key!r} is written by the exporter from the model; only "
                             f"{list(OVERRIDABLE_KEYS)} of its keys can be overridden")
    return metadata


def _architecture(config: dict) -> tuple[str, bool]:
    """(llama.cpp architecture, permute q/k) for an HF config, or a ValueError naming the supported ones."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"config.model_type: GGUF export supports {sorted(ARCHITECTURES)}, got {model_type!r}")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.hidden_act: llama.cpp's {model_type} graph uses silu, got {config['hidden_act']!r}")
    return ARCHITECTURES[model_type]


def _check_q4_1(module: str, q: QuantizedTensor, weight: torch.Tensor | None) -> None:
    """Raise ValueError naming `module` unless `q` maps to Q4_1 exactly (INT4, group 32, fp16-exact d and m)."""
    spec = q.spec
    if spec.kind != "int":
        raise ValueError(f"{module}: {spec.name} (NormalFloat) has no GGUF equivalent: Q4_1 needs int4-g32 "
                         f"codes with zero points; export with --gguf-type f16|q8_0")
    if spec.bits != 4:
        raise ValueError(f"{module}: {spec.bits}-bit codes: Q4_1 needs 4; export with --gguf-type f16|q8_0")
    if spec.group_size != Q4_1_BLOCK:
        raise ValueError(f"{module}: QA-LoRA group size {spec.group_size}: Q4_1 needs {Q4_1_BLOCK}; "
                         f"export with --gguf-type f16|q8_0")
    q.check()
    if weight is not None and tuple(weight.shape) != tuple(q.shape):
        raise ValueError(f"{module}: quantized shape {tuple(q.shape)} differs from its weight {tuple(weight.shape)}")
    for label, values in (("scales", q.scales), ("zero points", q.zeros)):
        exact = values.double() == values.to(torch.float16).double()
        if not bool(exact.all()):
            bad = int((~exact).sum())
            raise ValueError(f"{module}: {bad} of {values.numel()} {label} ({values.dtype}) are not exactly "
                             f"representable in float16, which Q4_1 stores; export with --gguf-type f16|q8_0")


# ------------------------------------------------------------------------------------------ hyperparameters


def _hparams(config: dict) -> dict:
    """The hyperparameters the converter reads, from an HF config (transformers 4 or 5 rope layout)."""
    missing = [k for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                           "vocab_size", "rms_norm_eps") if config.get(k) is None]
    if missing:
        raise ValueError(f"config: missing {missing}")
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if "rope_theta" not in rope and config.get("rope_theta") is not None:
        rope["rope_theta"] = config["rope_theta"]
    rope.setdefault("rope_type", rope.get("type"))
    if rope["rope_type"] not in (None, "default", "llama3", "linear", "yarn") or (
            rope["rope_type"] in ("linear", "yarn") and rope.get("factor") is None):
        raise ValueError(f"config rope scaling {rope}: GGUF export supports default, linear and yarn (with a "
                         f"factor) and llama3")
    n_head = config["num_attention_heads"]
    return {
        "n_layer": config["num_hidden_layers"], "n_ctx": config.get("max_position_embeddings"),
        "n_embd": config["hidden_size"], "n_ff": config["intermediate_size"], "n_head": n_head,
        "n_head_kv": config.get("num_key_value_heads") or n_head, "head_dim": config.get("head_dim"),
        "rope": rope, "eps": config["rms_norm_eps"], "n_vocab": config["vocab_size"],
        "tied": bool(config.get("tie_word_embeddings", False)),
    }


def _write_hparams(gguf, writer, arch: str, hp: dict, ftype: int) -> None:
    """The `{arch}.*` keys in the converter's order (TextModel.set_gguf_parameters, LlamaModel's additions)."""
    writer.add_block_count(hp["n_layer"])
    if hp["n_ctx"] is not None:
        writer.add_context_length(hp["n_ctx"])
    writer.add_embedding_length(hp["n_embd"])
    writer.add_feed_forward_length(hp["n_ff"])
    writer.add_head_count(hp["n_head"])
    writer.add_head_count_kv(hp["n_head_kv"])
    _write_rope_scaling(gguf, writer, hp["rope"])
    if hp["rope"].get("rope_theta") is not None:
        writer.add_rope_freq_base(hp["rope"]["rope_theta"])
    writer.add_layer_norm_rms_eps(hp["eps"])
    if hp["head_dim"] is not None:
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
    writer.add_file_type(ftype)
    if arch == "llama":
        writer.add_vocab_size(hp["n_vocab"])
        writer.add_rope_dimension_count(hp["head_dim"] or hp["n_embd"] // hp["n_head"])


def _write_rope_scaling(gguf, writer, rope: dict) -> None:
    """RoPE scaling keys (types checked in `_hparams`); llama3-style scaling is the rope_freqs tensor instead."""
    rope_type, factor = rope.get("rope_type"), rope.get("factor")
    if rope_type in (None, "default", "llama3"):
        return
    if rope_type == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        if rope.get("original_max_position_embeddings") is not None:
            writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])


def _rope_freqs(hp: dict) -> np.ndarray | None:
    """Llama 3.1-style per-frequency RoPE factors (the converter's LlamaModel.generate_extra_tensors)."""
    rope = hp["rope"]
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return None
    base = rope.get("rope_theta", 10000.0)
    dim = hp["head_dim"] or hp["n_embd"] // hp["n_head"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _file_type(gguf, gguf_type: str, any_q4_1: bool) -> int:
    """general.file_type: MOSTLY_Q4_1 when the matrices are Q4_1 (as llama-quantize sets it), else gguf_type's."""
    if any_q4_1:
        return gguf.LlamaFileType.MOSTLY_Q4_1
    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]


def _write_general(gguf, writer, config: dict, metadata: dict[str, str]) -> None:
    """general.type / name / size_label / quantization_version (the model-card keys are the caller's)."""
    writer.add_type(gguf.GGUFType.MODEL)
    source = config.get("_name_or_path") or config.get("_model_name_or_path") or ""
    default_name = os.path.basename(str(source).rstrip("/")) or "model"
    writer.add_name(metadata.get("general.name", default_name))
    total, shared, expert, n_expert = writer.get_total_parameter_count()
    writer.add_size_label(metadata.get("general.size_label", gguf.size_label(total, shared, expert, n_expert)))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# ------------------------------------------------------------------------------------------ tensors


def _expected_names(hp: dict, rope_freqs: bool) -> set[str]:
    """GGUF tensors llama.cpp's llama / qwen2 graphs require (biases are optional there)."""
    names = {"token_embd.weight", "output_norm.weight"} | ({"rope_freqs.weight"} if rope_freqs else set())
    if not hp["tied"]:
        names.add("output.weight")
    for i in range(hp["n_layer"]):
        names |= {f"blk.{i}.{t}.weight" for t in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                  "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    return names


def _plan_tensors(gguf, arch: str, permute: bool, hp: dict, tensors: dict[str, torch.Tensor],
                  quantized: dict[str, QuantizedTensor], gguf_type: str) -> list[_Planned]:
    """Every tensor mapped to its GGUF name and converted, or a ValueError for unknown / missing ones."""
    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), hp["n_layer"])
    hf_names = list(tensors) + [f"{m}.weight" for m in quantized if f"{m}.weight" not in tensors]
    planned: list[_Planned] = []
    freqs = _rope_freqs(hp)
    if freqs is not None:
        planned.append(_Planned("rope_freqs.weight", freqs, gguf.GGMLQuantizationType.F32))
    unknown = []
    for hf_name in hf_names:
        if hf_name.endswith(_SKIPPED_SUFFIXES) or (hp["tied"] and hf_name.startswith("lm_head.")):
            continue  # tied: llama.cpp reuses token_embd for the output, as the converter's files do
        new_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            unknown.append(hf_name)
            continue
        module = hf_name.rsplit(".", 1)[0]
        n_head = _permute_heads(hf_name, hp) if permute else None
        if hf_name.endswith(".weight") and module in quantized:
            planned.append(_q4_1_tensor(gguf, new_name, quantized[module], n_head))
        else:
            planned.append(_float_tensor(gguf, new_name, tensors[hf_name], n_head, gguf_type))
    if unknown:
        raise ValueError(f"tensors: no GGUF name for {len(unknown)} tensor(s) of a {arch} model: {unknown[:5]}")
    missing = sorted(_expected_names(hp, freqs is not None) - {t.name for t in planned})
    if missing:
        raise ValueError(f"tensors: missing {len(missing)} tensor(s) llama.cpp needs: {missing[:5]}")
    return planned


def _permute_heads(hf_name: str, hp: dict) -> int | None:
    """The head count to permute a q_proj / k_proj weight or bias with (None for other tensors)."""
    if ".q_proj." in hf_name:
        return hp["n_head"]
    if ".k_proj." in hf_name:
        return hp["n_head_kv"]
    return None


def _q4_1_tensor(gguf, name: str, q: QuantizedTensor, n_head: int | None) -> _Planned:
    blocks = torch.from_numpy(q4_1_blocks(q))
    if n_head is not None:
        blocks = llama_permute(blocks, n_head)  # whole rows move: every block stays intact
    return _Planned(name, np.ascontiguousarray(blocks.numpy()), gguf.GGMLQuantizationType.Q4_1)


def _float_tensor(gguf, name: str, tensor: torch.Tensor, n_head: int | None, gguf_type: str) -> _Planned:
    """A full-precision tensor at the converter's type: f32 for 1-D and norms, else `gguf_type`."""
    data = tensor.detach().to("cpu", torch.float32)
    if n_head is not None:
        data = llama_permute(data, n_head)
    array = np.ascontiguousarray(data.numpy())
    qtypes = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
              "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
    qtype = qtypes[gguf_type]
    if array.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        qtype = gguf.GGMLQuantizationType.F32
    try:
        return _Planned(name, gguf.quants.quantize(array, qtype), qtype)
    except gguf.QuantError:
        # a row length that is no multiple of the block: the converter falls back to f16 too
        return _Planned(name, gguf.quants.quantize(array, gguf.GGMLQuantizationType.F16),
                        gguf.GGMLQuantizationType.F16)
