"""`mtp eval` on a tiny local model: the table, the JSON, the chart and the losslessness check."""

import json

import pytest
import torch

from helpers import randomize_adapter, tiny_model
from test_train_cli import WORDS, saved_tiny_model, tiny_tokenizer

import mtp_model
from mtp_model.cli import main
from mtp_model import evaluate as evaluate_module
from mtp_model.evaluate import evaluate, format_table, read_prompts, sweep_configs


def test_eval_command_writes_table_json_and_chart(tmp_path, capsys):
    model_dir, adapter_dir = saved_tiny_model(tmp_path / "model"), tmp_path / "adapter"
    patched = randomize_adapter(mtp_model.patch(tiny_model(vocab_size=len(WORDS)), mtp_model.MTPConfig(num_masks=3, lora_rank=4)))
    mtp_model.save_adapter(patched, adapter_dir)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "w1 w2 w3", "domain": "code"},
        {"messages": [{"role": "user", "content": "w4 w5"}], "domain": "math"},
        {"prompt": "w7", "domain": "code"},
    ]) + "\n")
    out = tmp_path / "results.json"
    assert main(["eval", "--model", str(model_dir), "--adapter", str(adapter_dir), "--prompts", str(prompts),
                 "--out", str(out), "--max-steps", "6", "--save-fastest"]) == 0
    results = json.loads(out.read_text())
    assert results["identical_to_stock_greedy"] is True
    assert set(results["domains"]) == {"code", "math"}
    runs = results["domains"]["code"]["runs"]
    for mode in ("quadratic", "linear"):
        assert [r["num_masks"] for r in runs if r["decoding"] == mode and r["sampler"]] == [1, 2, 3]
    assert {(r["decoding"], r["sampler"]) for r in runs if r["num_masks"] == 3} == {
        ("quadratic", True), ("linear", True), ("quadratic", False), ("linear", False)}
    assert all(1.0 <= r["tokens_per_step"] <= r["num_masks"] + 1 for r in runs)
    assert (tmp_path / "results.png").stat().st_size > 0
    # Every domain together, and the fastest of those with the sampler made the adapter's generate default.
    overall = results["overall"]["runs"]
    assert len(overall) == len(runs)
    best = max((r for r in overall if r["sampler"]), key=lambda r: r["speedup"])
    saved = mtp_model.adapter.load_config(adapter_dir)
    assert (saved.generate_num_masks, saved.decoding) == (best["num_masks"], best["decoding"])
    assert saved.num_masks == 3
    printed = capsys.readouterr().out
    assert "tokens per step by number of masks" in printed and "prompt-lookup decoding (10 tokens)" in printed
    assert results["domains"]["math"]["prompt_lookup"]["speedup"] > 0


def test_steps_are_capped():
    model = randomize_adapter(mtp_model.patch(tiny_model(vocab_size=len(WORDS), eos_token_id=None),
                                              mtp_model.MTPConfig(num_masks=2, lora_rank=4)))
    results = evaluate(model, tiny_tokenizer(), [("all", "w1 w2")], max_steps=4)
    assert "all:" in format_table(results)
    assert model.mtp_stats["steps"] == 4  # the last run stopped at the step budget, not at a token budget


def test_prompts_per_domain(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"w{i}", "domain": d}) + "\n"
                            for i, d in enumerate(["code", "math", "code", "code", "math"])))
    assert read_prompts(path, per_domain=2) == [("code", "w0"), ("math", "w1"), ("code", "w2"), ("math", "w4")]
    assert len(read_prompts(path)) == 5


def test_prompt_file_errors_name_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "w1"}\n{"domain": "x"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2"):
        read_prompts(path)


def test_generate_uses_the_adapters_default_masks():
    model = randomize_adapter(mtp_model.patch(tiny_model(vocab_size=len(WORDS)),
                                              mtp_model.MTPConfig(num_masks=3, lora_rank=4, generate_num_masks=1)))
    ids = torch.tensor([[3, 4, 5]])
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12)
    assert model.mtp_stats["num_masks"] == 1
    assert max(model.mtp_stats["tokens_per_step_histogram"]) <= 2
    with pytest.raises(ValueError, match="generate_num_masks"):
        mtp_model.MTPConfig(num_masks=3, generate_num_masks=4)


def test_a_sweep_subset_without_the_prompt_lookup_baseline():
    model = randomize_adapter(mtp_model.patch(tiny_model(vocab_size=len(WORDS)),
                                              mtp_model.MTPConfig(num_masks=3, lora_rank=4)))
    configs = sweep_configs(3, [1, 3], ("linear",))
    assert configs == [(1, "linear", True), (3, "linear", True), (3, "linear", False)]
    results = evaluate(model, tiny_tokenizer(), [("all", "w1 w2"), ("all", "w3")], max_steps=5, repeats=1,
                       configs=configs, prompt_lookup=None)
    assert [(r["num_masks"], r["decoding"], r["sampler"]) for r in results["overall"]["runs"]] == configs
    assert "prompt_lookup" not in results["overall"] and results["identical_to_stock_greedy"]
    assert "linear" in format_table(results)


def test_a_wrong_token_is_caught(monkeypatch):
    model = randomize_adapter(mtp_model.patch(tiny_model(vocab_size=len(WORDS)),
                                              mtp_model.MTPConfig(num_masks=2, lora_rank=4)))
    generate = model.generate

    def broken(**options):
        out = generate(**options)
        out[0, -1] = (out[0, -1] + 1) % len(WORDS)
        return out

    monkeypatch.setattr(model, "generate", broken)
    results = evaluate(model, tiny_tokenizer(), [("all", "w1 w2")], max_steps=3, repeats=1,
                       configs=sweep_configs(2, [2], ("quadratic",)), prompt_lookup=None)
    assert results["identical_to_stock_greedy"] is False


def test_a_run_that_outlives_stocks_output_is_timed_to_the_tokens_both_made(monkeypatch):
    """In half precision a row may take the other branch at one of stock's near-ties and stop later than
    stock did (stock met EOS): the run is timed against stock to the tokens both made, and not identical."""
    model = randomize_adapter(mtp_model.patch(tiny_model(vocab_size=len(WORDS)),
                                              mtp_model.MTPConfig(num_masks=2, lora_rank=4)))
    stock = evaluate_module._stock

    def stopping_early(*args, **options):  # stock's output three tokens shorter, as if it had met EOS
        out, seconds = stock(*args, **options)
        return out[:, :-3], seconds[:-3]

    monkeypatch.setattr(evaluate_module, "_stock", stopping_early)
    results = evaluate(model, tiny_tokenizer(), [("all", "w1 w2")], max_steps=4, repeats=1,
                       configs=sweep_configs(2, [2], ("quadratic",)), prompt_lookup=3)
    assert results["identical_to_stock_greedy"] is False
    run = results["overall"]["runs"][0]
    assert run["tokens_per_second"] > 0 and run["speedup"] > 0 and results["overall"]["prompt_lookup"]["speedup"] > 0
