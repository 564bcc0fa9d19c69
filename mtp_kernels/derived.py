"""`derived(kind, sources, build)`: a value computed from weights, built once and kept while they live and
stay unchanged. Inference keeps such values: oneDNN-packed copies of weights (`cpu_linear`), alone or with
their LoRA factors stacked under them or merged into them (`cpu_linear.gated_lora_on_packed`), and the
sampler's token table (`sampler.draft_chain`).

An entry is keyed by `kind`, any `extra` hashables and the identity of each source tensor; it holds a weak
reference to each source and each source's (data pointer, version). An in-place update bumps the version
and `.to()` or assigning `.data` makes a new storage, so either rebuilds the value on its next lookup; a
freed source drops the entry, and with it the value. (A WeakKeyDictionary would compare tensors with ==,
which is elementwise.) Decoding asks for these values in every projection of every step, so a lookup is
that one comparison.

An edit through `.data` (or a numpy view), or a fused optimizer's step (fused AdamW, the HF Trainer's
default), changes a tensor's contents without bumping its version, so no per-lookup check can see it. The
module keeps a fingerprint of each source's contents as they were when a value was last built from it, and
`refresh()` drops every value whose source's fingerprint has changed: a generate call runs in `refreshed()`,
which refreshes once before its first step. That is one read of each source per call, against building every
value again per call, which costs about fifteen times more. On the CPU the fingerprint is a CRC-32 of each
16 MiB of the source's bytes (zlib-ng's, which reads tens of GB/s; the standard library's zlib gives the same
values, several times slower, where zlib-ng is not installed), so it costs no memory: a change within 32
consecutive bits (any one fp32 weight) is always seen, any other change is missed with probability about 2^-32
per chunk it touches. On other devices, where hashing would mean copying to the host, it is a copy of the
source, compared exactly. Outside a generate call an optimizer may step between any two lookups, so callers
derive values only from `trusted` tensors: frozen ones, or any inside `refreshed()`.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Callable, Hashable

import torch

try:
    from zlib_ng.zlib_ng import crc32
except ImportError:
    from zlib import crc32

_cache: dict[tuple, tuple] = {}  # key -> (weak references to the sources, their states, their ids, value)
_fingerprints: dict[int, tuple] = {}  # id(source) -> (weak reference to it, its fingerprint when a value was built)
_CHUNK_BYTES = 16 << 20  # a CPU fingerprint's CRC unit (CRC-32 is weakest on messages past 512 MiB)
_refreshed: contextvars.ContextVar[bool] = contextvars.ContextVar("mtp_derived_refreshed", default=False)


def cache_key(kind: str, sources: tuple[torch.Tensor, ...], *extra: Hashable) -> tuple:
    return (kind, *extra, *map(id, sources))


def derived(kind: str, sources: tuple[torch.Tensor, ...], build: Callable[[], object], *extra: Hashable):
    """`build()` (run without autograd) for these sources, from the cache when they have not changed; the
    caller checks `trusted(*sources)` first."""
    key = cache_key(kind, sources, *extra)
    state = [_state(source) for source in sources]
    entry = _cache.get(key)
    # A present entry's sources are alive (freeing one drops the entry), so the ids in its key are theirs.
    if entry is None or entry[1] != state:
        for source in sources:
            _remember(source)
        # The callbacks hold the dicts themselves: at interpreter exit a tensor may be freed after this
        # module's globals are cleared.
        references = [weakref.ref(source, lambda _, key=key, cache=_cache: cache.pop(key, None)) for source in sources]
        # Outside inference mode even when the caller is in it: a value may be the source of another (the
        # draft head's packed copy), and inference tensors have no version counter to key on.
        with torch.inference_mode(False), torch.no_grad():
            entry = (references, state, {id(source) for source in sources}, build())
        _cache[key] = entry
    return entry[3]


def _state(source: torch.Tensor) -> tuple[int, int]:
    """(data pointer, version); an inference tensor has no version counter, and is `trusted` only inside
    `refreshed()`, whose fingerprints see its edits."""
    return source.data_ptr(), -1 if source.is_inference() else source._version


@contextlib.contextmanager
def refreshed():
    """`refresh()`, then every tensor is `trusted` in the block: for a caller that no optimizer step
    interleaves with (a generate call)."""
    refresh()
    token = _refreshed.set(True)
    try:
        yield
    finally:
        _refreshed.reset(token)


def trusted(*tensors: torch.Tensor | None) -> bool:
    """Whether values derived from these tensors (None: absent) may be cached: each requires no grad, or
    this runs inside `refreshed()`. A trainable tensor may be written by an optimizer without a version bump
    (fused AdamW, the HF Trainer's default) between any two lookups, where no check can see it; an inference
    tensor has no version to bump."""
    return _refreshed.get() or not any(t is not None and (t.requires_grad or t.is_inference()) for t in tensors)


def refresh() -> None:
    """Drops every value built from a source whose contents have changed since (see the module docstring)."""
    # dict.copy() takes its snapshot in C, where no garbage collection (whose weak-reference callbacks pop
    # entries) can run mid-way, as it can while list() walks the items.
    kept = [(source_id, reference(), fingerprint)
            for source_id, (reference, fingerprint) in _fingerprints.copy().items()]
    kept = [entry for entry in kept if entry[1] is not None]
    crcs = _crcs([source for _, source, _ in kept])
    for (source_id, source, fingerprint), source_crcs in zip(kept, crcs):
        if not _unchanged(source, fingerprint, source_crcs):
            _forget(source_id)


def _remember(source: torch.Tensor) -> None:
    """Keeps the fingerprint of `source` as a value is built from it; values built from older contents go."""
    source_id = id(source)
    (crcs,) = _crcs([source])
    kept = _fingerprints.get(source_id)
    if kept is not None and _unchanged(source, kept[1], crcs):
        return
    _forget(source_id)
    reference = weakref.ref(source, lambda _, fingerprints=_fingerprints: fingerprints.pop(source_id, None))
    contents = crcs if crcs is not None else source.detach().clone()
    _fingerprints[source_id] = (reference, (source.shape, source.dtype, contents))


def _crcs(sources: list[torch.Tensor]) -> list[tuple[int, ...] | None]:
    """The CRC-32s of each CPU source's 16 MiB chunks; None for a source on another device."""
    found = []
    for source in sources:
        if source.device.type != "cpu":
            found.append(None)
            continue
        data = source.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        starts = range(0, max(len(data), 1), _CHUNK_BYTES)
        found.append(tuple(crc32(data[start : start + _CHUNK_BYTES]) for start in starts))
    return found


def _unchanged(source: torch.Tensor, fingerprint: tuple, crcs: tuple[int, ...] | None) -> bool:
    """Whether `source` (whose chunks' CRCs are `crcs`, None off the CPU) still has the fingerprinted contents."""
    shape, dtype, contents = fingerprint
    if source.shape != shape or source.dtype != dtype or isinstance(contents, tuple) != (crcs is not None):
        return False
    return contents == crcs if crcs is not None else bool(torch.equal(source.detach(), contents))


def _forget(source_id: int) -> None:
    _fingerprints.pop(source_id, None)
    for key, entry in _cache.copy().items():
        if source_id in entry[2]:
            _cache.pop(key, None)
