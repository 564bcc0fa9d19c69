"""`mtp train` end to end on a tiny local model, and the data checks behind it."""

import json

import pytest
import torch
from helpers import tiny_model
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import mtp_model
from mtp_model.cli import main
from mtp_model.data import read_jsonl, self_distill, tokenize_pairs

WORDS = ["<pad>", "<eos>", "<bos>"] + [f"w{i}" for i in range(60)] + ["user", "assistant", ":"]


def tiny_tokenizer(chat_template=None, pad=True):
    vocab = {word: index for index, word in enumerate(WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", bos_token="<bos>",
                                        pad_token="<pad>" if pad else None)
    tokenizer.chat_template = chat_template
    return tokenizer


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def saved_tiny_model(path, family="llama", **overrides):
    """A tiny model and the test tokenizer saved as a Hugging Face directory, as `mtp train --model` takes."""
    tiny_model(family, vocab_size=len(WORDS), **overrides).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def counting_records(count):
    records = []
    for start in range(count):
        words = [f"w{(start + i) % 60}" for i in range(12)]
        if start % 2:
            records.append({"prompt": " ".join(words[:3]), "response": " ".join(words[3:])})
        else:
            records.append({"messages": [{"role": "user", "content": " ".join(words[:3])},
                                         {"role": "assistant", "content": " ".join(words[3:])}]})
    return records


def test_train_command_writes_a_loadable_adapter(tmp_path):
    model_dir = saved_tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "data.jsonl", counting_records(24))
    out = tmp_path / "adapter"
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--num-masks", "3",
                 "--rank", "4", "--steps", "3", "--batch", "4", "--lr", "1e-3"]) == 0
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    model = mtp_model.patch(tiny_model(vocab_size=len(WORDS)), adapter=out)
    assert model.mtp_config.num_masks == 3


def test_bf16_training_keeps_the_adapter_in_fp32(tmp_path):
    """--bf16 runs the model in bf16 under autocast; the trained adapter is fp32, so that small optimizer
    updates are not rounded away, and it loads into a bf16 model."""
    model_dir = saved_tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "data.jsonl", counting_records(16))
    out = tmp_path / "adapter"
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--num-masks", "2",
                 "--rank", "4", "--steps", "2", "--batch", "4", "--bf16"]) == 0
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert {tensor.dtype for name, tensor in saved.items() if "lora_" in name or "sampler" in name} == {torch.float32}
    model = mtp_model.patch(tiny_model(vocab_size=len(WORDS)).to(torch.bfloat16), adapter=out)
    assert model.mtp.sampler.mlp[0].weight.dtype == torch.bfloat16


def test_a_time_limit_ends_the_run_with_its_adapter_and_a_checkpoint(tmp_path, capsys):
    model_dir = saved_tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "data.jsonl", counting_records(24))
    out = tmp_path / "adapter"
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--num-masks", "3",
            "--rank", "4", "--batch", "4", "--steps", "1000", "--save-steps", "500"]
    assert main([*argv, "--max-minutes", "1e-6"]) == 0  # past its limit at the end of the first step
    state = json.loads((out / "checkpoints" / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["global_step"] == 1 and (out / "adapter_model.safetensors").is_file()
    with pytest.raises(SystemExit) as refused:
        main([*argv, "--overwrite", "--max-minutes", "0"])
    assert refused.value.code == 2 and "argument --max-minutes: must be > 0" in capsys.readouterr().err


def test_a_run_can_start_from_another_adapter(tmp_path, capsys):
    model_dir = saved_tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "data.jsonl", counting_records(8))
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--num-masks", "3", "--rank", "4", "--batch", "4"]
    assert main([*argv, "--out", str(tmp_path / "first"), "--steps", "2"]) == 0
    with pytest.raises(SystemExit) as refused:  # checked before any model loads
        main([*argv, "--out", str(tmp_path / "second"), "--steps", "1", "--init-from", str(tmp_path / "nowhere")])
    assert refused.value.code == 2 and "nowhere is neither an adapter directory" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "second"), "--steps", "1", "--sampler-residual",
                 "--init-from", str(tmp_path / "first")]) == 0
    assert "fresh: mtp.sampler.residual_scale" in capsys.readouterr().out
    second = mtp_model.patch(tiny_model(vocab_size=len(WORDS)), adapter=tmp_path / "second")
    assert second.mtp_config.sampler_residual


def test_overwrite_replaces_an_adapter_and_its_checkpoints(tmp_path):
    model_dir = saved_tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "data.jsonl", counting_records(8))
    out = tmp_path / "adapter"
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--rank", "4", "--batch", "4"]
    assert main([*argv, "--num-masks", "3", "--steps", "3"]) == 0
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-3"]
    with pytest.raises(SystemExit) as refused:  # the default: no silent overwrite
        main([*argv, "--num-masks", "2", "--steps", "2"])
    assert refused.value.code == 2
    assert main([*argv, "--num-masks", "2", "--steps", "2", "--overwrite"]) == 0
    assert mtp_model.adapter.load_config(out).num_masks == 2
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-2"]  # the old run's are gone


def test_train_command_refuses_sequences_past_a_sliding_window(tmp_path, monkeypatch, capsys):
    model_dir = saved_tiny_model(tmp_path / "model", "mistral", sliding_window=64)
    data = write_jsonl(tmp_path / "data.jsonl", counting_records(4))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", None)  # refused before the model is loaded
    with pytest.raises(SystemExit) as refused:
        main(["train", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "adapter"),
              "--num-masks", "3", "--max-length", "62", "--steps", "1"])
    assert refused.value.code == 2
    assert "mtp train: error: this model attends within a sliding window of 64 tokens" in capsys.readouterr().err


def test_chat_template_is_used_for_messages():
    template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}assistant :"
    tokenizer = tiny_tokenizer(chat_template=template)
    pairs = [([{"role": "user", "content": "w1 w2"}], "w3 w4")]
    [example] = tokenize_pairs(tokenizer, pairs, max_length=64)
    words = tokenizer.convert_ids_to_tokens(example["input_ids"].tolist())
    assert words == ["user", ":", "w1", "w2", "assistant", ":", "w3", "w4", "<eos>"]
    assert example["loss_mask"].tolist() == [False] * 6 + [True] * 3


@pytest.mark.parametrize(("record", "message"), [
    ({"messages": [{"role": "user", "content": "w1"}]}, "the last message is the response"),
    ({"messages": [{"role": "assistant", "content": "w1"}]}, "the last message is the response"),
    ({"messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": 5}]}, "every message needs"),
    ({"prompt": "w1", "response": "w2", "stopped": "no"}, "'stopped' must be true or false"),
])
def test_records_that_would_train_on_the_wrong_text_are_named(tmp_path, record, message):
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "w1", "response": "w2"}, record])
    with pytest.raises(ValueError, match=f"data.jsonl:2: {message}"):
        read_jsonl(path)


def test_stopped_and_prompt_only_records(tmp_path):
    """'stopped' counts on prompt/response records too (a cut continuation gets no EOS); a chat record that
    ends with the user's turn is a prompt, taken only for self-distillation."""
    prompt = [{"role": "user", "content": "w3"}]
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "w1", "response": "w2", "stopped": False},
                                                 {"messages": prompt}])
    assert read_jsonl(path, prompts_only=True) == [("w1", "w2", False), (prompt, None)]


def test_a_distillation_budget_without_self_distillation_is_refused(tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", counting_records(4))
    with pytest.raises(SystemExit):
        main(["train", "--model", str(saved_tiny_model(tmp_path / "model")), "--data", str(data), "--out",
              str(tmp_path / "out"), "--distill-max-new-tokens", "9"])
    assert "--distill-max-new-tokens needs --self-distill" in capsys.readouterr().err


def test_malformed_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "w1", "response": "w2"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_jsonl(path)
    write_jsonl(path, [{"prompt": "w1", "response": "w2"}, {"question": "w1"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_jsonl(path)


def test_empty_and_long_examples_are_counted_in_warnings():
    tokenizer = tiny_tokenizer()
    pairs = [("w1", ""), ("w1 w2", " ".join(["w5"] * 30)), ("w1", "w2 w3")]
    with pytest.warns(UserWarning) as caught:
        examples = tokenize_pairs(tokenizer, pairs, max_length=10)
    messages = " ".join(str(w.message) for w in caught)
    assert "skipped 1 example(s) with an empty response" in messages
    assert "truncated 1 example(s)" in messages
    assert [len(e["input_ids"]) for e in examples] == [10, 4]


def test_self_distillation_uses_the_models_greedy_output():
    model = tiny_model(vocab_size=len(WORDS))
    tokenizer = tiny_tokenizer(pad=False)  # no pad token: EOS stands in, as for many base models
    distilled = self_distill(model, tokenizer, [("w1 w2", "w9"), ("w3", "w8")], max_new_tokens=5)
    ids = torch.tensor([tokenizer("w1 w2")["input_ids"]])
    greedy = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                            pad_token_id=tokenizer.eos_token_id)
    assert distilled[0] == ("w1 w2", tokenizer.decode(greedy[0, 2:], skip_special_tokens=True), False)


def test_a_continuation_cut_at_its_budget_gets_no_eos():
    # Cut by max_new_tokens, the model would have gone on: an EOS there would teach the drafts a stop.
    tokenizer = tiny_tokenizer()
    cut, stopped = tokenize_pairs(tokenizer, [("w1", "w2 w3", False), ("w1", "w2 w3", True)], max_length=16)
    assert tokenizer.convert_ids_to_tokens(cut["input_ids"].tolist()) == ["w1", "w2", "w3"]
    assert tokenizer.convert_ids_to_tokens(stopped["input_ids"].tolist()) == ["w1", "w2", "w3", "<eos>"]
    model = tiny_model(vocab_size=len(WORDS))
    model.generation_config.eos_token_id = None
    ids = torch.tensor([tokenizer("w1 w2")["input_ids"]])
    greedy = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                            pad_token_id=0)[0, 2:].tolist()
    stop = next(i for i in range(1, 8) if greedy[i] not in greedy[:i])
    model.generation_config.eos_token_id = greedy[stop]  # a model that stops where it said greedy[stop]
    [(_, response, stopped)] = self_distill(model, tokenizer, [("w1 w2", "")], max_new_tokens=8)
    assert stopped and response == tokenizer.decode(greedy[:stop])


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_lr_schedule_sets_the_learning_rate_after_warm_up(tmp_path, schedule):
    model_dir = saved_tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "data.jsonl", counting_records(8))
    out = tmp_path / "adapter"
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--num-masks", "2",
                 "--rank", "4", "--batch", "2", "--lr", "1e-3", "--steps", "4", "--warmup-steps", "1",
                 "--lr-schedule", schedule]) == 0
    state = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    rates = [entry["learning_rate"] for entry in state["log_history"] if "learning_rate" in entry]
    assert len(rates) == 4
    if schedule == "constant":
        assert rates[1:] == pytest.approx([1e-3] * 3)
    else:  # decays to 0 at the last step
        assert all(later < earlier for earlier, later in zip(rates[1:], rates[2:])) and rates[1] <= 1e-3
