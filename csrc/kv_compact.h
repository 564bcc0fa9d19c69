// KV-cache compaction: what the CPU code (kv_compact.cpp) and the CUDA code (kv_compact_cuda.cu) share.
//
// For caches c (every layer's K and V, each [B, H, S, D] with the same strides), row b and head h: entry
// lengths[b] + keep[b, i] moves to slot lengths[b] + i for every i below the row's kept count, then
// lengths[b] grows by that count. keep is [B, K] int64, strictly increasing indices into this step's
// block of block_size entries, padded with -1 at the end.
//
// Free of torch and CUDA headers: the .cpp includes it without a CUDA toolkit, the .cu without torch.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define MTP_HOST_DEVICE __host__ __device__
#else
#define MTP_HOST_DEVICE
#endif

namespace mtp {

enum KvCompactError : int32_t {
  kOk = 0,
  kBlockPastCache = 1,    // lengths[b] < 0 or lengths[b] + block_size > S
  kKeepOutsideBlock = 2,  // keep[b, i] >= block_size
  kKeepNotIncreasing = 3,
  kKeepAfterPadding = 4,  // an index after a -1
};

struct RowCheck {
  int32_t error;     // a KvCompactError
  int64_t kept;      // number of kept entries, when error == kOk
  int64_t in_place;  // leading kept entries already in their slot (keep[b, i] == i): nothing to move
};

// Validates row b (keep_row = keep + b * max_keep) and counts its kept entries. Shared by the CPU
// path and the CUDA check kernel, so both refuse exactly the same input.
MTP_HOST_DEVICE inline RowCheck check_row(const int64_t* keep_row, int64_t max_keep, int64_t length,
                                          int64_t block_size, int64_t slots) {
  if (length < 0 || length > slots - block_size) return {kBlockPastCache, 0, 0};
  int64_t kept = 0, in_place = 0;
  while (kept < max_keep && keep_row[kept] >= 0) {
    if (keep_row[kept] >= block_size) return {kKeepOutsideBlock, 0, 0};
    if (kept > 0 && keep_row[kept] <= keep_row[kept - 1]) return {kKeepNotIncreasing, 0, 0};
    if (in_place == kept && keep_row[kept] == kept) ++in_place;
    ++kept;
  }
  for (int64_t i = kept; i < max_keep; ++i) {
    if (keep_row[i] >= 0) return {kKeepAfterPadding, 0, 0};
  }
  return {kOk, kept, in_place};
}

struct KvCompactCudaArgs {
  void* const* caches;  // host array of num_caches device base pointers
  int64_t num_caches;
  int64_t batch, heads, slots;
  int64_t entry_bytes;                             // head_dim * element size (the head_dim stride is 1)
  int64_t stride_batch, stride_head, stride_slot;  // in bytes
  int64_t* lengths;                                // [batch], device
  const int64_t* keep;                             // [batch, max_keep] contiguous, device
  int64_t max_keep;
  int64_t block_size;
  int32_t* status;  // device scratch of 2 + 2 * batch int32: error, its row, kept and in_place per row
};

// Enqueues the compaction on cuda_stream (a cudaStream_t): one launch validates every row and, only if
// all are valid, advances the lengths; then one launch per 256 caches copies. status[0] holds the first
// bad row's KvCompactError and status[1] that row, so the caller reads status[0] to raise; on an error
// nothing is written. status[2 + b] and status[2 + batch + b] hold row b's kept and in_place counts.
// Returns 0, or the cudaError_t of a failed launch.
int launch_kv_compact(const KvCompactCudaArgs& args, void* cuda_stream);

// cudaGetErrorString for the host code that includes no CUDA header.
const char* cuda_error_string(int error);

}  // namespace mtp
