"""Training data for MTP adapters: JSONL files -> tokenized examples with a response mask.

Each line is either `{"messages": [{"role": ..., "content": ...}, ...]}` (the last message is the response,
everything before it the prompt) or `{"prompt": ..., "response": ...}`. With a chat template the prompt is
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
    """(line number, record) for each non-blank line; invalid JSON raises ValueError naming the line."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None


def read_jsonl(path: str | Path) -> list[tuple[str | list, str]]:
    """(prompt, response) pairs; the prompt is a message list for chat data. Errors name the line."""
    pairs = []
    for number, record in iter_jsonl(path):
        if isinstance(record, dict) and isinstance(record.get("messages"), list) and record["messages"]:
            messages = record["messages"]
            if not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
                raise ValueError(f"{path}:{number}: every message needs 'role' and 'content'")
            pairs.append((messages[:-1], messages[-1]["content"]))
        elif isinstance(record, dict) and isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
            pairs.append((record["prompt"], record["response"]))
        else:
            raise ValueError(f"{path}:{number}: expected {{'messages': [...]}} or {{'prompt': str, 'response': str}}")
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
    distilled = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        prompts = [prompt_ids(tokenizer, prompt) for prompt, _ in chunk]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        device = model.get_input_embeddings().weight.device
        out = generate(model, input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                       do_sample=False, pad_token_id=tokenizer.pad_token_id)
        for (prompt, *_), continuation in zip(chunk, out[:, width:].tolist()):
            stop = next((i for i, token in enumerate(continuation) if token in stop_ids), None)
            stopped = stop is not None
            continuation = continuation[:stop]
            distilled.append((prompt, tokenizer.decode(continuation, skip_special_tokens=True), stopped))
    return distilled
