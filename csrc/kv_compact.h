// Launcher of the CUDA KV-compaction kernel, callable from host code that includes no CUDA headers.
//
// One launch moves the kept entries of every layer's K and V: for cache c (a pointer per cache, all
// with the same [B, H, S, D] strides), row b and head h, entry lengths[b] + keep[b, i] moves to slot
// lengths[b] + i for i < count(keep[b] >= 0). Elements are copied as raw bytes (2 or 4 each), so the
// kernel needs no dtype. Errors (a kept index outside the block, indices not strictly increasing, a
// block that does not fit the cache) set *error_flag to a non-zero code instead of copying.
#pragma once

#include <cstdint>

namespace mtp {

struct KvCompactArgs {
  void* const* caches;  // device array of num_caches base pointers
  int64_t num_caches;
  int64_t batch, heads, slots, head_dim;
  int64_t stride_batch, stride_head, stride_slot;  // in elements; the head_dim stride must be 1
  int64_t element_size;                            // bytes: 2 or 4
  const int64_t* lengths;                          // [batch], device
  const int64_t* keep;                             // [batch, max_keep], device
  int64_t max_keep;
  int64_t block_size;
  int32_t* error_flag;  // device scalar, 0 on success
};

// Copies in units of unit_bytes (16, 4 or 2): the caller picks the widest unit that divides every
// stride, head_dim * element_size and every base pointer's alignment. Returns 0 when the launch was
// issued, otherwise a cudaError_t value.
int launch_kv_compact(const KvCompactArgs& args, int unit_bytes, void* cuda_stream);

// Advances lengths[b] by the number of kept entries of row b, unless the copy flagged an error (run
// after launch_kv_compact on the same stream).
int launch_advance_lengths(int64_t* lengths, const int64_t* keep, int64_t batch, int64_t max_keep,
                           const int32_t* error_flag, void* cuda_stream);

}  // namespace mtp
