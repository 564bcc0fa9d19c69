"""The adapter recipe's pieces on a tiny model: resumable self-distillation to a file, and the training file
made of exactly the recipe's prompts."""

import json
from pathlib import Path

import pytest
from helpers import tiny_model
from test_train_cli import WORDS, tiny_tokenizer, write_jsonl

from mtp_model import data, recipes


def prompt_records(count):
    return [{"id": f"p{i}", "messages": [{"role": "user", "content": f"w{3 + i} w{4 + i}"}]} for i in range(count)]


def test_distillation_resumes_where_it_stopped(tmp_path, monkeypatch):
    model, tokenizer = tiny_model(vocab_size=len(WORDS)), tiny_tokenizer()
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_records(5))
    out = tmp_path / "distilled.jsonl"
    calls = []
    distill = data.self_distill
    monkeypatch.setattr(data, "self_distill", lambda *a, **k: calls.append(len(a[2])) or distill(*a, **k))
    data.distill_jsonl(model, tokenizer, prompts, out, max_new_tokens=4, batch_size=2, chunk=2)
    first = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in first) == [f"p{i}" for i in range(5)] and calls == [2, 2, 1]
    assert all(r["messages"][-1]["role"] == "assistant" and isinstance(r["stopped"], bool) for r in first)
    # An interrupted run: the last chunk's records are lost; a rerun makes only those.
    out.write_text("".join(line + "\n" for line in out.read_text().splitlines()[:3]))
    calls.clear()
    data.distill_jsonl(model, tokenizer, prompts, out, max_new_tokens=4, batch_size=2, chunk=2)
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert calls == [2] and sorted(r["id"] for r in again) == sorted(r["id"] for r in first)
    assert {r["id"]: r for r in again} == {r["id"]: r for r in first}  # greedy: the same replies


def test_the_training_file_holds_exactly_the_recipes_prompts(tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_records(3))
    replies = [{"id": f"p{i}", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                "stopped": True} for i in (2, 9, 0, 1)]  # p9: a prompt an older list had
    distilled = write_jsonl(tmp_path / "distilled.jsonl", replies)
    out = recipes._training_file(prompts, distilled, tmp_path / "train.jsonl")
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["p0", "p1", "p2"]
    assert [len(pair) for pair in data.read_jsonl(out)] == [3, 3, 3]  # (prompt, response, stopped)
    first_two = recipes._training_file(prompts, distilled, tmp_path / "train-2.jsonl", count=2)
    assert [json.loads(line)["id"] for line in first_two.read_text().splitlines()] == ["p0", "p1"]
    write_jsonl(distilled, replies[:2])
    with pytest.raises(RuntimeError, match="2 prompts of .* have no distilled reply yet"):
        recipes._training_file(prompts, distilled, tmp_path / "train.jsonl")


def test_training_stages_run_in_order_each_from_the_one_before_and_skip_when_done(tmp_path, monkeypatch):
    model_dir = tmp_path / "model"
    tiny_tokenizer().save_pretrained(model_dir)
    work = tmp_path / "work"
    for stage in ("one", "two"):
        (work / stage).mkdir(parents=True)
    write_jsonl(work / "prompts.jsonl", prompt_records(2))
    write_jsonl(work / "distilled.jsonl", [
        {"id": f"p{i}", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
         "stopped": True} for i in range(2)])
    recipe = recipes.Recipe(2, 64, 4, 2, stages=(recipes.TrainingStage("one", ("--steps", "2"), prompts=1),
                                                 recipes.TrainingStage("two", ("--steps", "3"), init_from="one")))
    monkeypatch.setitem(recipes.RECIPES, "toy", recipe)
    monkeypatch.setattr(recipes, "model_directory", lambda name: model_dir)
    monkeypatch.setattr(recipes, "SHIPPED_DIR", tmp_path / "shipped")
    calls = []

    def train(argv):
        calls.append(argv)
        out = argv[argv.index("--out") + 1]
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            (Path(out) / name).write_text(out)
        return 0

    monkeypatch.setattr("mtp_model.train_cli.train_main", train)
    shipped = recipes.build_adapter("toy", work, stage="train")
    assert [call[call.index("--out") + 1] for call in calls] == [str(work / "one"), str(work / "two")]
    assert "--init-from" not in calls[0] and calls[1][calls[1].index("--init-from") + 1] == str(work / "one")
    trained_on = [Path(call[call.index("--data") + 1]).read_text().splitlines() for call in calls]
    assert [len(lines) for lines in trained_on] == [1, 2]  # stage one: the first prompt's reply only
    assert (shipped / "adapter_model.safetensors").read_text() == str(work / "two")  # the last stage ships
    calls.clear()
    recipes.build_adapter("toy", work, stage="train")
    assert calls == []  # both finished: nothing reruns


def test_a_longer_prompt_list_keeps_the_shorter_one_as_its_prefix(monkeypatch):
    turns = [{"id": f"t{i}", "prompt": "w3 " * (1 + i % 5)} for i in range(40)]
    monkeypatch.setattr("mtp_model.prompts.sharegpt_first_turns", lambda split: list(turns))
    tokenizer = tiny_tokenizer()
    short = recipes.training_prompts(tokenizer, recipes.Recipe(8, 64, 4, 2))
    long = recipes.training_prompts(tokenizer, recipes.Recipe(16, 64, 4, 2))
    assert len(short) == 8 and len(long) == 16 and long[:8] == short


def test_every_recipe_stage_starts_from_an_earlier_one():
    for recipe in recipes.RECIPES.values():
        outs = [stage.out for stage in recipe.stages]
        assert len(set(outs)) == len(outs)
        for position, stage in enumerate(recipe.stages):
            assert stage.init_from is None or stage.init_from in outs[:position]
