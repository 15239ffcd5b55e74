"""Writing a model folder safely (atomically, readable like its config) and a tokenizer as JSON files alone.

Both a built-in tiny model and a converted GGUF (workers/model_source.py, workers/gguf_convert.py) are written into
a temporary folder renamed into place; a tokenizer travels in cache entries as its JSON files only, which must
load on their own and tokenize like the original.
"""

from __future__ import annotations

import os
from collections.abc import Callable


def read_bytes(path: str) -> bytes:
    """The bytes of the file at `path`."""
    with open(path, "rb") as f:
        return f.read()


def check_tokenizer_copy(tokenizer, files: dict[str, bytes]) -> None:
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


def write_atomically(path: str, write: Callable[[str], None], last_file: str) -> None:
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
