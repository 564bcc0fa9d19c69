"""`derived(kind, sources, build)`: a value computed from weights, built once and kept while they live and
stay unchanged. Inference keeps three such values: oneDNN-packed copies of weights (`cpu_linear`), weights
with their LoRA merged in (`cpu_linear.gated_lora_on_packed`) and the sampler's token table
(`sampler.draft_chain`).

An entry is keyed by `kind`, any `extra` hashables and the identity of each source tensor; it holds a weak
reference to each source and each source's (data pointer, version). An in-place update bumps the version
and `.to()` makes a new tensor, so either rebuilds the value; a freed source drops the entry, and with it
the value. (A WeakKeyDictionary would compare tensors with ==, which is elementwise.) Decoding asks for
these values in every projection of every step, so a lookup is that one comparison (about 1-2 us).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Hashable

import torch

_cache: dict[tuple, tuple] = {}  # key -> (weak references to the sources, their states, value)


def cache_key(kind: str, sources: tuple[torch.Tensor, ...], *extra: Hashable) -> tuple:
    return (kind, *extra, *map(id, sources))


def derived(kind: str, sources: tuple[torch.Tensor, ...], build: Callable[[], object], *extra: Hashable):
    """`build()` (run without autograd) for these sources, from the cache when they have not changed."""
    key = cache_key(kind, sources, *extra)
    state = [(source.data_ptr(), source._version) for source in sources]
    entry = _cache.get(key)
    # A present entry's sources are alive (freeing one drops the entry), so the ids in its key are theirs.
    if entry is None or entry[1] != state:
        forget = functools.partial(_cache.pop, key, None)
        references = [weakref.ref(source, lambda _: forget()) for source in sources]
        with torch.no_grad():
            entry = (references, state, build())
        _cache[key] = entry
    return entry[2]
