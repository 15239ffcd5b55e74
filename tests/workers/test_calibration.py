"""workers/calibration.py: Gram matrices of real layer inputs, and the calibration data they come from."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from workers.calibration import (
    CalibrationError,
    CalibrationSource,
    calibration_fingerprint,
    gather_grams,
    read_calibration,
)
from workers.cloq import calibrated_init
from workers.loftq import adapter_delta, loftq_init
from workers.model_source import materialize_tiny
from workers.quant import QuantSpec, dequantize

TEXTS = ["the cat sat on the mat", "a quick brown fox jumps over the lazy dog near the river bank",
         "two plus two is four", "numbers: 1 2 3 4 5 6 7 8 9 10 11 12", "hello", "calibration is a fixed sample"]
LAYER0 = "model.layers.0."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    source = materialize_tiny("tiny-llama", str(tmp_path_factory.mktemp("models")))
    model = transformers.AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
    return model, transformers.AutoTokenizer.from_pretrained(source.path), source.linear_modules


def inputs_of(model, tokenizer, module: str, texts: list[str]) -> torch.Tensor:
    """The module's input rows [n, in], one unpadded text at a time: the reference for the hooks."""
    rows = []
    handle = dict(model.named_modules())[module].register_forward_pre_hook(
        lambda _m, inputs: rows.append(inputs[0].reshape(-1, inputs[0].shape[-1]).detach().clone()))
    with torch.no_grad():
        for text in texts:
            model(**tokenizer(text, return_tensors="pt"))
    handle.remove()
    return torch.cat(rows)


def test_grams_are_the_mean_input_products_over_real_tokens(tiny):
    model, tokenizer, modules = tiny
    result = gather_grams(model, tokenizer, TEXTS, modules, batch_size=4)  # padded batches: masked out
    for module in (LAYER0 + "self_attn.q_proj", LAYER0 + "self_attn.o_proj", LAYER0 + "mlp.down_proj"):
        x = inputs_of(model, tokenizer, module, TEXTS)
        assert result.tokens == x.shape[0]
        torch.testing.assert_close(result.grams[module], x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)
    assert set(result.grams) == set(modules) and result.samples == len(TEXTS)


def test_layers_reading_one_input_share_one_gram(tiny):
    model, tokenizer, modules = tiny
    grams = gather_grams(model, tokenizer, TEXTS, modules).grams
    q, k, v, o = (grams[LAYER0 + f"self_attn.{p}_proj"] for p in "qkvo")
    assert q is k and k is v and o is not q
    assert grams[LAYER0 + "mlp.gate_proj"] is grams[LAYER0 + "mlp.up_proj"]
    assert grams[LAYER0 + "mlp.down_proj"] is not grams[LAYER0 + "mlp.up_proj"]
    assert grams[LAYER0 + "self_attn.q_proj"] is not grams["model.layers.1.self_attn.q_proj"]


def test_batching_does_not_change_the_grams_and_runs_are_deterministic(tiny):
    model, tokenizer, modules = tiny
    one = gather_grams(model, tokenizer, TEXTS, modules, batch_size=1)
    many = gather_grams(model, tokenizer, TEXTS, modules, batch_size=6)
    again = gather_grams(model, tokenizer, TEXTS, modules, batch_size=6)
    assert one.tokens == many.tokens and one.fingerprint == many.fingerprint
    for name in modules:
        torch.testing.assert_close(one.grams[name], many.grams[name], rtol=1e-4, atol=1e-5)
        assert torch.equal(many.grams[name], again.grams[name])
        gram = many.grams[name]
        eigenvalues = torch.linalg.eigvalsh(gram.double())  # PSD up to float32 rounding (fewer tokens than dims)
        assert torch.allclose(gram, gram.T) and eigenvalues.min() > -1e-6 * eigenvalues.max()


def test_truncation_progress_and_a_missing_module(tiny):
    model, tokenizer, modules = tiny
    seen = []
    short = gather_grams(model, tokenizer, TEXTS, modules[:1], max_length=4, batch_size=4,
                         on_batch=lambda done, total: seen.append((done, total)))
    assert short.tokens == sum(min(len(tokenizer(t)["input_ids"]), 4) for t in TEXTS)
    assert seen == [(4, 6), (6, 6)]
    with pytest.raises(KeyError, match="model.layers.9.mlp.up_proj"):
        gather_grams(model, tokenizer, TEXTS, ["model.layers.9.mlp.up_proj"])


def test_a_gathered_gram_lowers_the_output_error_on_those_inputs(tiny):
    """cloq's first iterate has the same Q as LoftQ's, and the best weighted rank-r step for it: never worse."""
    model, tokenizer, _ = tiny
    module = LAYER0 + "mlp.down_proj"
    x = inputs_of(model, tokenizer, module, TEXTS)
    gram = gather_grams(model, tokenizer, TEXTS, [module]).grams[module]
    weight = dict(model.named_modules())[module].weight.detach()
    spec = QuantSpec("nf", 2, 64)

    def output_error(result) -> float:
        approx = dequantize(result.quantized) + adapter_delta(result.lora_A, result.lora_B, result.scale)
        return (torch.linalg.vector_norm((weight - approx) @ x.T) / torch.linalg.vector_norm(weight @ x.T)).item()

    calibrated = calibrated_init(weight, gram, spec, rank=8, iters=1, svd="exact", damping=1e-6)
    plain = loftq_init(weight, spec, rank=8, iters=1, svd="exact")
    assert output_error(calibrated) <= output_error(plain) + 1e-6


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_reading_texts_takes_the_first_non_empty_rows(tmp_path):
    file = write_rows(tmp_path / "c.jsonl", [{"text": t, "n": i} for i, t in enumerate(["a", "", "  ", "b", "c"])])
    two = read_calibration(CalibrationSource(file, ("text",), samples=2, max_length=64))
    assert two.texts == ("a", "b") and two.max_length == 64 and file in two.origin
    assert read_calibration(CalibrationSource(file, samples=100)).texts == ("a", "b", "c")
    assert two.key_fields() == {"fingerprint": calibration_fingerprint(["a", "b"], 64), "samples": 2,
                                "max_length": 64, "damping": 1.0}


def test_columns_are_joined_as_training_sees_a_prompt_and_its_answer(tmp_path):
    rows = [{"q": "what is 2 plus 3?", "a": "5"}, {"q": "", "a": ""}, {"q": "hi", "a": None}]
    data = read_calibration(CalibrationSource(write_rows(tmp_path / "qa.jsonl", rows), ("q", "a")))
    assert data.texts == ("what is 2 plus 3? 5", "hi")


def test_a_latin1_csv_reads_with_its_encoding(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes("text,label\ncaf\xe9 au lait,1\n".encode("latin-1"))
    assert read_calibration(CalibrationSource(str(path), csv_encoding="latin-1")).texts == ("café au lait",)
    with pytest.raises(CalibrationError, match="calibration.file: cannot read"):
        read_calibration(CalibrationSource(str(path)))


@pytest.mark.parametrize("case, field", [("missing", "calibration.file"), ("suffix", "calibration.file"),
                                          ("column", "calibration.column"), ("numbers", "calibration.column"),
                                          ("empty", "calibration.file"), ("broken", "calibration.file"),
                                          ("samples", "calibration.samples")])
def test_an_unusable_calibration_file_names_it(tmp_path, case, field):
    good = write_rows(tmp_path / "good.jsonl", [{"text": "x"}])
    source = {
        "missing": CalibrationSource(str(tmp_path / "nowhere.jsonl")),
        "suffix": CalibrationSource(str(tmp_path / "data.txt")),
        "column": CalibrationSource(good, ("prompt",)),
        "numbers": CalibrationSource(write_rows(tmp_path / "numbers.jsonl", [{"text": 3}])),
        "empty": CalibrationSource(write_rows(tmp_path / "blank.jsonl", [{"text": ""}])),
        "broken": CalibrationSource(str(tmp_path / "broken.jsonl")),
        "samples": CalibrationSource(good, samples=0),
    }[case]
    if case == "broken":
        (tmp_path / "broken.jsonl").write_text('{"text": "a"\nnot json\n')
    with pytest.raises(CalibrationError) as info:
        read_calibration(source)
    message = str(info.value)
    assert message.startswith(field)
    if case != "samples":
        assert source.file.rsplit("/", 1)[-1] in message
    if case == "column":
        assert "'prompt'" in message and "'text'" in message  # the missing column, and the ones there are


def test_the_fingerprint_covers_texts_order_count_and_length():
    base = calibration_fingerprint(["ab", "c"], 512)
    assert base == calibration_fingerprint(["ab", "c"], 512)
    others = [calibration_fingerprint(["a", "bc"], 512), calibration_fingerprint(["c", "ab"], 512),
              calibration_fingerprint(["ab"], 512), calibration_fingerprint(["ab", "c"], 256)]
    assert len({base, *others}) == 5


def test_a_holdout_skips_the_rows_a_task_evaluates_on(tmp_path):
    from workers.tasks import split_indices

    file = write_rows(tmp_path / "t.jsonl", [{"text": f"row {i}"} for i in range(20)])
    data = read_calibration(CalibrationSource(file, samples=100, holdout=(0.25, 3)))
    train, held = split_indices(20, 0.25, 3)
    assert data.texts == tuple(f"row {i}" for i in sorted(train)) and len(held) == 5
