"""The demo model's corpus, built from what every machine has, deterministically.

Three domains:
- code: Python source of the standard library (held out by file, from a hash of the path);
- math: step-by-step arithmetic and small word problems from a seeded generator;
- prose: docstrings of the standard library (same file split as code).
Three splits: "train" (every file not held out; `pretraining_text` reads the leading ones' code and
docstrings, and the first MATH_TRAIN_COUNT problems), "adapter" (the train files and problems that
pretraining never reads) and "heldout" (files and problems disjoint from both). `prompt_pairs` gives prompt/response pairs (a
function's first lines -> its body, a problem -> its worked solution, a docstring's first sentence -> the
rest) of the adapter split for self-distillation and of the held-out split for evaluation. The adapter
split matters: self-distilled on text the base model has memorised, the drafts learn to recall that text,
while on new prompts the model says something else (`benchmarks/results/README.md`, "The demo model's
build").

Every pair is cut where the byte-level pre-tokenizer cuts the joined text (the prompt never ends in
whitespace; the response carries the leading space or newline), so the prompt and the response tokenized
apart give the tokens the model saw in pretraining. A prompt ending in "Solution: " would instead end in a
lone space token the model never saw before a number, and it answers nonsense.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import random
import sysconfig
from pathlib import Path

DOMAINS = ("code", "math", "prose")
MATH_TRAIN_COUNT = 30_000  # problems in the pretraining text; the held-out ones avoid all of them
PRETRAIN_CODE_CHARS = 1_500_000  # of the train files' source, file by file
PRETRAIN_PROSE_CHARS = 600_000  # of the train files' docstrings, file by file
_HELDOUT_MATH_GUARD = 1_000  # the adapter's problems avoid this many held-out ones (the harness uses 20)


def _held_out(path: Path) -> bool:
    return hashlib.sha256(path.as_posix().encode()).digest()[0] % 10 == 0


def stdlib_files(split: str) -> list[Path]:
    """The stdlib files of a split ("train", "adapter" or "heldout"), sorted."""
    if split == "adapter":
        read = {path for path, _ in _code_files(PRETRAIN_CODE_CHARS)}
        read |= {path for path, _ in _docstring_files(PRETRAIN_PROSE_CHARS)}
        return [path for path in stdlib_files("train") if path not in read]
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train', 'adapter' or 'heldout', got {split!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if any(part in ("test", "tests", "site-packages", "idlelib", "lib2to3") for part in relative.parts):
            continue
        if path.stat().st_size > 200_000 or _held_out(relative) != (split == "heldout"):
            continue
        files.append(path)
    return files


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def _parsed_files(split: str):
    """(path, source lines, syntax tree) of each parsable stdlib file of the split."""
    for path in stdlib_files(split):
        text = _read(path)
        try:
            tree = ast.parse(text or "")
        except SyntaxError:
            continue
        yield path, (text or "").splitlines(), tree


def _code_files(max_chars: int, split: str = "train") -> list[tuple[Path, str]]:
    """(path, source) of the split's leading files, whole files until `max_chars` is reached."""
    files, total = [], 0
    for path in stdlib_files(split):
        text = _read(path)
        if text is None:
            continue
        files.append((path, text))
        total += len(text)
        if total >= max_chars:
            break
    return files


def code_texts(split: str, max_chars: int) -> list[str]:
    return [text for _, text in _code_files(max_chars, split)]


def _file_docstrings(split: str):
    """(path, its docstrings longer than 80 characters) of each parsable stdlib file of the split."""
    for path, _, tree in _parsed_files(split):
        documented = (node for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)))
        yield path, [doc for doc in map(ast.get_docstring, documented) if doc and len(doc) > 80]


def _docstring_files(max_chars: int, split: str = "train") -> list[tuple[Path, list[str]]]:
    """(path, docstrings) of the split's leading files, whole files until `max_chars` is reached."""
    files, total = [], 0
    for path, docs in _file_docstrings(split):
        files.append((path, docs))
        total += sum(map(len, docs))
        if total >= max_chars:
            break
    return files


def docstrings(split: str, max_chars: int) -> list[str]:
    return [doc.strip() for _, docs in _docstring_files(max_chars, split) for doc in docs]


_NAMES = ["Ada", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jade"]
_THINGS = ["apples", "books", "coins", "marbles", "pencils", "stamps", "cards", "shells"]


def math_problem(rng: random.Random) -> tuple[str, str]:
    """One (problem, worked solution) pair."""
    kind = rng.randrange(4)
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 12)
    if kind == 0:
        return f"Compute {a} + {b}.", f"{a} + {b} = {a + b}.\nThe answer is {a + b}."
    if kind == 1:
        return (f"Compute ({a} + {b}) * {c}.",
                f"Step 1: {a} + {b} = {a + b}.\nStep 2: {a + b} * {c} = {(a + b) * c}.\nThe answer is {(a + b) * c}.")
    if kind == 2:
        big, small = max(a, b), min(a, b)
        return (f"Compute {big} - {small} + {c}.",
                f"Step 1: {big} - {small} = {big - small}.\nStep 2: {big - small} + {c} = {big - small + c}.\n"
                f"The answer is {big - small + c}.")
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    return (f"{name} has {a} {thing}. {name} buys {c} bags with {b} {thing} in each bag. "
            f"How many {thing} does {name} have now?",
            f"{name} buys {c} * {b} = {c * b} {thing}.\n{name} has {a} + {c * b} = {a + c * b} {thing}.\n"
            f"The answer is {a + c * b}.")


def math_pairs(split: str, count: int) -> list[tuple[str, str]]:
    """The first `count` problems of the split. The space of small problems is narrow (about 10k sums), so
    each later split's generator skips the problems of the earlier ones rather than trusting its own seed:
    held-out skips pretraining's, the adapter's skips both."""
    if split == "train":
        if count > MATH_TRAIN_COUNT:
            raise ValueError(f"the train split has {MATH_TRAIN_COUNT} problems (only those are kept out of the others)")
        rng = random.Random(1234)
        return [math_problem(rng) for _ in range(count)]
    if split == "heldout":
        if count > _HELDOUT_MATH_GUARD:
            raise ValueError(f"at most {_HELDOUT_MATH_GUARD} held-out problems (only those are kept out of the adapter's)")
        seen, rng = set(math_pairs("train", MATH_TRAIN_COUNT)), random.Random(98765)
    elif split == "adapter":
        seen = set(math_pairs("train", MATH_TRAIN_COUNT)) | set(math_pairs("heldout", _HELDOUT_MATH_GUARD))
        rng = random.Random(4321)
    else:
        raise ValueError(f"split must be 'train', 'adapter' or 'heldout', got {split!r}")
    pairs = []
    while len(pairs) < count:
        pair = math_problem(rng)
        if pair not in seen:
            seen.add(pair)  # no problem twice within the split either
            pairs.append(pair)
    return pairs


def math_document(problem: str, solution: str) -> str:
    return f"Problem: {problem}\nSolution: {solution}"


def pretraining_text(code_chars: int = PRETRAIN_CODE_CHARS, prose_chars: int = PRETRAIN_PROSE_CHARS) -> list[str]:
    """Documents of the train split, shuffled with a fixed seed."""
    documents = code_texts("train", code_chars) + docstrings("train", prose_chars)
    documents += [math_document(q, a) for q, a in math_pairs("train", MATH_TRAIN_COUNT)]
    random.Random(0).shuffle(documents)
    return documents


def _function_pairs(split: str, count: int, head_lines: int = 2) -> list[tuple[str, str]]:
    pairs = []
    for _, lines, tree in _parsed_files(split):
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno >= 4:
                body = lines[node.lineno - 1 : node.end_lineno]
                indent = len(body[0]) - len(body[0].lstrip())
                text = "\n".join(line[indent:].rstrip() for line in body)
                cut = len("\n".join(line[indent:] for line in body[:head_lines]).rstrip())
                pairs.append((text[:cut], text[cut:]))
                if len(pairs) >= count:
                    return pairs
    return pairs


def _prose_pairs(split: str, count: int) -> list[tuple[str, str]]:
    pairs = []
    for doc in itertools.chain.from_iterable(docs for _, docs in _file_docstrings(split)):
        first, dot, rest = doc.strip().partition(". ")
        if dot and len(rest) > 40:
            pairs.append((first + ".", " " + rest))
        if len(pairs) >= count:
            break
    return pairs


def prompt_pairs(split: str, per_domain: int | dict[str, int]) -> dict[str, list[tuple[str, str]]]:
    """Up to `per_domain` prompt/response pairs per domain (one count for all, or one per domain) of the
    "adapter" or the "heldout" split."""
    if split not in ("adapter", "heldout"):
        raise ValueError(f"prompt pairs come from the 'adapter' or the 'heldout' split, got {split!r}")
    counts = per_domain if isinstance(per_domain, dict) else dict.fromkeys(DOMAINS, per_domain)
    if set(counts) != set(DOMAINS):
        raise ValueError(f"per_domain must give a count for each of {DOMAINS}, got {sorted(counts)}")
    return {
        "code": _function_pairs(split, counts["code"]),
        "math": [(f"Problem: {q}\nSolution:", f" {a}") for q, a in math_pairs(split, counts["math"])],
        "prose": _prose_pairs(split, counts["prose"]),
    }
