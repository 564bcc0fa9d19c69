"""Training data for MTP adapters: JSONL files -> tokenized examples with a response mask.

Each line is either `{"messages": [{"role": ..., "content": ...}, ...]}` (the last message, the assistant's,
is the response, everything before it the prompt) or `{"prompt": ..., "response": ...}`. With a chat template the prompt is
rendered by the tokenizer's template with the generation prompt; without one it is the plain prompt text.
The response is followed by EOS, unless the pair is a triple (prompt, response, False): a continuation
cut at a token budget, after which the model would not have stopped. Examples are
`{"input_ids": [n], "loss_mask": [n]}` (True on response tokens), the input of `training.MTPDataCollator`.

`self_distill` replaces every response by the base model's own greedy continuation of the prompt, so the
drafts learn what the model will actually say; it returns (prompt, response, stopped) triples.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch


def iter_jsonl(path: str | Path):
    """(line number, record) for each non-blank line of a UTF-8 file (a leading byte-order mark is allowed).
    A line that is not UTF-8 or not valid JSON raises ValueError naming the file and line: read as bytes and
    decoded line by line, because a text-mode read fails per buffer, without a line number."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}:{number}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column "
                                 f"{error.start + 1})") from None
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None


def read_jsonl(path: str | Path, prompts_only: bool = False) -> list[tuple]:
    """(prompt, response) pairs; the prompt is a message list for chat data, whose last message is the
    response and must be the assistant's, after at least one other. A record with a boolean "stopped" (as
    `distill_jsonl` writes) gives a (prompt, response, stopped) triple. With `prompts_only` (data whose
    responses self-distillation replaces) a chat record may end with the prompt's own last turn: (prompt,
    None). Errors name the line."""
    pairs = []
    for number, record in iter_jsonl(path):
        where = f"{path}:{number}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected {{'messages': [...]}} or {{'prompt': str, 'response': str}}")
        stopped = record.get("stopped")
        if stopped is not None and not isinstance(stopped, bool):
            raise ValueError(f"{where}: 'stopped' must be true or false")
        stop = () if stopped is None else (stopped,)
        if isinstance(record.get("messages"), list) and record["messages"]:
            messages = record["messages"]
            if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                       for m in messages):
                raise ValueError(f"{where}: every message needs a string 'role' and a string 'content'")
            if messages[-1]["role"] == "assistant" and len(messages) > 1:
                pairs.append((messages[:-1], messages[-1]["content"]) + stop)
            elif prompts_only and messages[-1]["role"] != "assistant":
                pairs.append((messages, None))
            else:
                raise ValueError(f"{where}: the last message is the response: an 'assistant' message after at "
                                 f"least one other" + ("" if prompts_only else " (prompt-only records need "
                                                       "--self-distill)"))
        elif isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
            pairs.append((record["prompt"], record["response"]) + stop)
        else:
            raise ValueError(f"{where}: expected {{'messages': [...]}} or {{'prompt': str, 'response': str}}")
    return pairs


def prompt_ids(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, list):
        if getattr(tokenizer, "chat_template", None):
            # Render to text, then tokenize: the return type of tokenize=True differs across versions.
            text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        prompt = "\n".join(m["content"] for m in prompt)
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def tokenize_pairs(tokenizer, pairs, max_length: int) -> list[dict]:
    """Examples for the collator from (prompt, response) pairs or (prompt, response, ends_with_eos) triples;
    empty responses are skipped and long ones truncated, each with a warning."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    examples, empty, truncated = [], 0, 0
    for prompt, response, *stopped in pairs:
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        if not response_ids:
            empty += 1
            continue
        ids = prompt_ids(tokenizer, prompt)
        # A cut continuation ends without EOS: its last masks get no label rather than a made-up stop.
        full = ids + response_ids + (eos if not stopped or stopped[0] else [])
        loss_mask = [False] * len(ids) + [True] * (len(full) - len(ids))
        if len(full) > max_length:
            truncated += 1
            full, loss_mask = full[:max_length], loss_mask[:max_length]
            if not any(loss_mask[1:]):
                continue  # the prompt alone fills the budget: nothing left to learn from
        examples.append({"input_ids": torch.tensor(full), "loss_mask": torch.tensor(loss_mask)})
    if empty:
        warnings.warn(f"skipped {empty} example(s) with an empty response", stacklevel=2)
    if truncated:
        warnings.warn(f"truncated {truncated} example(s) longer than max_length={max_length} tokens", stacklevel=2)
    if not examples:
        raise ValueError("no usable training example (all responses empty or cut off)")
    return examples


@torch.no_grad()
def self_distill(model, tokenizer, pairs, max_new_tokens: int, batch_size: int = 8) -> list[tuple]:
    """(prompt, the model's own greedy response, whether it stopped at EOS before max_new_tokens) for each
    pair's prompt (run before patching, or on stock generate)."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token first")
        tokenizer.pad_token = tokenizer.eos_token
    generate = type(model).generate  # stock greedy even on a patched model
    configured = getattr(model.generation_config, "eos_token_id", None)
    configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    stop_ids = {i for i in [*configured, tokenizer.eos_token_id] if i is not None}  # what generate stops at
    distilled = [None] * len(pairs)
    encoded = [prompt_ids(tokenizer, prompt) for prompt, *_ in pairs]
    order = sorted(range(len(pairs)), key=lambda i: len(encoded[i]))  # batches of like lengths pad little
    for start in range(0, len(pairs), batch_size):
        chunk = order[start : start + batch_size]
        prompts = [encoded[i] for i in chunk]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        device = model.get_input_embeddings().weight.device
        out = generate(model, input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                       do_sample=False, pad_token_id=tokenizer.pad_token_id)
        for index, continuation in zip(chunk, out[:, width:].tolist()):
            stop = next((i for i, token in enumerate(continuation) if token in stop_ids), None)
            distilled[index] = (pairs[index][0], tokenizer.decode(continuation[:stop], skip_special_tokens=True),
                                stop is not None)
    return distilled


def distill_jsonl(model, tokenizer, prompts_path: str | Path, out_path: str | Path, max_new_tokens: int,
                  batch_size: int = 16, chunk: int = 64, progress=None) -> Path:
    """`self_distill` from a prompt file to a training file, resumable: records of `prompts_path` ({"messages"}
    or {"prompt"}, with an "id" or else their line number) whose id is already in `out_path` are skipped,
    and results are appended `chunk` prompts at a time, so an interrupted run loses at most one chunk.
    Each output line is {"id", "messages": [..., assistant response], "stopped"}."""
    out_path = Path(out_path)
    done = {record.get("id") for _, record in iter_jsonl(out_path)} if out_path.is_file() else set()
    todo = []
    for number, record in iter_jsonl(prompts_path):
        messages = record.get("messages") if isinstance(record, dict) else None
        if messages is None and isinstance(record, dict) and isinstance(record.get("prompt"), str):
            messages = [{"role": "user", "content": record["prompt"]}]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{prompts_path}:{number}: expected {{'messages': [...]}} or {{'prompt': str}}")
        if messages[-1].get("role") == "assistant":
            messages = messages[:-1]  # a reference answer: replaced by the model's own
        record_id = str(record.get("id", number))
        if record_id not in done:
            todo.append((record_id, messages))
    todo.sort(key=lambda item: len(prompt_ids(tokenizer, item[1])))  # chunks of like lengths pad little
    with open(out_path, "a", encoding="utf-8") as handle:
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            results = self_distill(model, tokenizer, [(messages, "") for _, messages in part], max_new_tokens,
                                   batch_size)
            for (record_id, messages), (_, response, stopped) in zip(part, results):
                line = {"id": record_id, "messages": [*messages, {"role": "assistant", "content": response}],
                        "stopped": stopped}
                handle.write(json.dumps(line) + "\n")
            handle.flush()
            if progress is not None:
                progress(min(start + chunk, len(todo)), len(todo))
    return out_path


def most_frequent_tokens(examples: list[dict], count: int, vocab_size: int, always: tuple[int, ...] = ()) -> torch.Tensor:
    """A draft vocabulary: the `count` ids seen most often in the examples' responses (where loss_mask is
    True), the ids in `always` (EOS, say) first; equal counts go to the smaller id. Sorted ids [count]."""
    if not 1 <= count <= vocab_size:
        raise ValueError(f"a draft vocabulary of {count} tokens does not fit a vocabulary of {vocab_size}")
    responses = [torch.as_tensor(e["input_ids"])[torch.as_tensor(e["loss_mask"]).bool()] for e in examples]
    counts = torch.bincount(torch.cat(responses) if responses else torch.zeros(0, dtype=torch.long), minlength=vocab_size)
    order = torch.sort(counts, descending=True, stable=True).indices.tolist()
    return torch.tensor(sorted(list(dict.fromkeys([*always, *order]))[:count]))
