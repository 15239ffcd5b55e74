"""The tokenizer part of a GGUF file (workers/gguf_export.py writes the rest), as llama.cpp's converter writes it.

BPE (gpt2-style) from tokenizer.json: tokens in id order, token types and `tokenizer.ggml.pre` chosen like the
converter's `get_vocab_base` / `get_vocab_base_pre`; special ids, merges and the chat template through the gguf
package's `SpecialVocab`. SentencePiece tokenizers are refused with a clear error.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

# The converter's probe text and sha256(str(token ids)) -> llama.cpp pre-tokenizer name (a subset of
# convert_hf_to_gguf.py's get_vocab_base_pre, for the tokenizers of the architectures gguf_export writes).
PRE_TOKENIZER_PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f "
    "(multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 "
    "3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785"
    "\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= \u043d\u0435\u0449\u043e "
    "\u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 ''''''```````\"\"\"\"......!!!!!!?????? "
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZER_HASHES = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Smaug-Llama-3-70B
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen/Qwen1.5-7B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen/Qwen3-Embedding-0.6B
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",  # R1-Distill-Qwen
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo-Base-2407
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
}


@dataclass
class Vocab:
    """What the GGUF file says of the tokenizer: tokens in id order, their types, the pre-tokenizer, the rest."""

    tokens: list[str]
    token_types: list[int]
    pre: str
    special: object  # gguf.SpecialVocab
    add_space_prefix: bool | None


def bpe_vocab(gguf, tokenizer_dir: str, config: dict, arch: str, metadata: dict[str, str]) -> Vocab:
    """The converter's gpt2 vocabulary: tokens, types and pre-tokenizer name, plus SpecialVocab (`gguf` is the
    gguf package; `metadata` may name the pre-tokenizer and the chat template)."""
    _check_tokenizer_files(tokenizer_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokens, token_types = _tokens(gguf, tokenizer, config["vocab_size"], tokenizer_dir)
    pre = metadata.get("tokenizer.ggml.pre") or _pre_tokenizer(tokenizer, tokenizer_dir)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True)
    if not special.merges:
        raise ValueError(f"tokenizer {tokenizer_dir}: tokenizer.json has no BPE merges")
    for typ in special.special_token_types:  # what config.json would give when the tokenizer dir has none
        token_id = config.get(f"{typ}_token_id")
        if typ not in special.special_token_ids and isinstance(token_id, int) and 0 <= token_id:
            special.special_token_ids[typ] = token_id
    if "tokenizer.chat_template" in metadata:
        special.chat_template = metadata["tokenizer.chat_template"]
    add_space_prefix = None
    if arch == "llama":
        tokenizer_config = _read_json(os.path.join(tokenizer_dir, "tokenizer_config.json")) or {}
        add_space_prefix = tokenizer_config.get("add_prefix_space")
        if config["vocab_size"] == 49152:
            special.add_special_token["bos"] = False  # the converter's rule for these (SmolLM, Granite) vocabs
    return Vocab(tokens, token_types, pre, special, add_space_prefix)


def _check_tokenizer_files(tokenizer_dir: str) -> None:
    """Refuse the tokenizers this exporter cannot write (SentencePiece, non-BPE, byte-fallback BPE)."""
    if os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.model")):
        raise ValueError(f"tokenizer {tokenizer_dir}: SentencePiece tokenizers (tokenizer.model) are not "
                         f"supported by the GGUF export yet; only BPE tokenizer.json (gpt2-style) is")
    data = _read_json(os.path.join(tokenizer_dir, "tokenizer.json"))
    if data is None:
        raise ValueError(f"tokenizer {tokenizer_dir}: no tokenizer.json")
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ValueError(f"tokenizer {tokenizer_dir}: {model.get('type')} model (byte_fallback="
                         f"{model.get('byte_fallback')}): only byte-level BPE (gpt2-style) tokenizers are supported")


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _tokens(gguf, tokenizer, vocab_size: int, tokenizer_dir: str) -> tuple[list[str], list[int]]:
    """Tokens in id order with their types, as the converter's get_vocab_base: added special (or
    special-looking) tokens are CONTROL, other added tokens USER_DEFINED, ids without a token [PAD{i}]."""
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"tokenizer {tokenizer_dir}: token id {max(vocab.values())} does not fit the model's "
                         f"vocab_size {vocab_size}")
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        kind = gguf.TokenType.NORMAL
        if token in added:
            if not decoder[i].normalized:  # llama.cpp expects added tokens pre-normalized
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                kind = gguf.TokenType.CONTROL
            else:
                token = token.replace("\u2581", " ")
                kind = gguf.TokenType.USER_DEFINED
        tokens.append(token)
        types.append(kind)
    return tokens, types


def _looks_special(token: str) -> bool:
    """The converter's does_token_look_special: <|...|>-style and a few known names are control tokens."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _pre_tokenizer(tokenizer, tokenizer_dir: str) -> str:
    """llama.cpp's pre-tokenizer name, identified as its converter does: the hash of the probe's token ids."""
    digest = hashlib.sha256(str(tokenizer.encode(PRE_TOKENIZER_PROBE)).encode()).hexdigest()
    name = PRE_TOKENIZER_HASHES.get(digest)
    if name is None:
        raise ValueError(
            f"tokenizer {tokenizer_dir}: unrecognised BPE pre-tokenizer (probe sha256 {digest}); llama.cpp would "
            f"split text wrongly with a guessed one. Look the hash up in llama.cpp's convert_hf_to_gguf.py "
            f"(get_vocab_base_pre) and pass metadata={{'tokenizer.ggml.pre': NAME}}; known here: "
            f"{sorted(set(PRE_TOKENIZER_HASHES.values()))}")
    return name


def write_vocab(writer, vocab: Vocab) -> None:
    """tokenizer.ggml.* and the chat template, in the converter's order."""
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    vocab.special.add_to_gguf(writer, quiet=True)
