// CUDA KV-cache compaction: one launch for every layer's K and V (see kv_compact.h for the contract).
//
// Deliberately free of torch headers so that `nvcc -c` can check it on a machine whose torch is a CPU
// build; the host glue lives in kv_compact.cpp.
//
// Grid: one thread block per (cache, row, head). The block walks the kept entries in increasing order
// and all its threads copy one entry's head_dim elements together. Entry i is written to slot
// lengths[b] + i and read from lengths[b] + keep[b, i] >= that slot, so writing entry i can only
// clobber the source of an entry already copied; the barrier between entries makes that ordering hold
// across threads. Copies of different (cache, row, head) never overlap, so blocks need no ordering.
#include <cuda_runtime.h>

#include <cstdint>

#include "kv_compact.h"

namespace mtp {
namespace {

constexpr int kThreads = 128;

enum ErrorCode : int32_t {
  kOk = 0,
  kKeepOutsideBlock = 1,
  kKeepNotIncreasing = 2,
  kBlockPastCache = 3,
};

__device__ int32_t check_row(const int64_t* keep_row, int64_t max_keep, int64_t length, int64_t block_size,
                             int64_t slots, int64_t* kept) {
  if (length < 0 || length + block_size > slots) return kBlockPastCache;
  int64_t previous = -1;
  int64_t count = 0;
  for (int64_t i = 0; i < max_keep; ++i) {
    const int64_t index = keep_row[i];
    if (index < 0) break;  // -1 padding ends the list
    if (index >= block_size) return kKeepOutsideBlock;
    if (index <= previous) return kKeepNotIncreasing;
    previous = index;
    ++count;
  }
  for (int64_t i = count; i < max_keep; ++i) {
    if (keep_row[i] >= 0) return kKeepNotIncreasing;  // an index after the padding
  }
  *kept = count;
  return kOk;
}

template <typename Unit>
__global__ void kv_compact_kernel(KvCompactArgs args, int64_t units_per_entry) {
  const int64_t program = blockIdx.x;
  const int64_t head = program % args.heads;
  const int64_t row = (program / args.heads) % args.batch;
  const int64_t cache = program / (args.heads * args.batch);

  // Every block validates every row (a few hundred integers) so that one bad row stops all copies:
  // invalid input then leaves the caches untouched.
  __shared__ int64_t kept_in_row;
  int32_t error = kOk;
  for (int64_t r = threadIdx.x; r < args.batch; r += blockDim.x) {
    int64_t kept = 0;
    const int32_t row_error =
        check_row(args.keep + r * args.max_keep, args.max_keep, args.lengths[r], args.block_size, args.slots, &kept);
    if (row_error != kOk) error = row_error;
    if (r == row) kept_in_row = kept;
  }
  if (__syncthreads_or(error != kOk)) {
    if (error != kOk) atomicCAS(args.error_flag, 0, error);
    return;
  }
  const int64_t* keep_row = args.keep + row * args.max_keep;
  const int64_t length = args.lengths[row];
  const int64_t kept = kept_in_row;

  char* base = static_cast<char*>(args.caches[cache]) +
               (row * args.stride_batch + head * args.stride_head) * args.element_size;
  const int64_t slot_bytes = args.stride_slot * args.element_size;
  for (int64_t i = 0; i < kept; ++i) {
    const int64_t source_slot = length + keep_row[i];
    const int64_t target_slot = length + i;
    if (source_slot != target_slot) {
      const Unit* source = reinterpret_cast<const Unit*>(base + source_slot * slot_bytes);
      Unit* target = reinterpret_cast<Unit*>(base + target_slot * slot_bytes);
      for (int64_t u = threadIdx.x; u < units_per_entry; u += blockDim.x) target[u] = source[u];
    }
    __syncthreads();
  }
}

__global__ void advance_lengths_kernel(int64_t* lengths, const int64_t* keep, int64_t batch, int64_t max_keep,
                                       const int32_t* error_flag) {
  const int64_t row = blockIdx.x * blockDim.x + threadIdx.x;
  if (row >= batch || *error_flag != kOk) return;
  int64_t kept = 0;
  while (kept < max_keep && keep[row * max_keep + kept] >= 0) ++kept;
  lengths[row] += kept;
}

}  // namespace

int launch_kv_compact(const KvCompactArgs& args, int unit_bytes, void* cuda_stream) {
  const int64_t blocks = args.num_caches * args.batch * args.heads;
  if (blocks == 0 || args.max_keep == 0) return 0;
  cudaStream_t stream = static_cast<cudaStream_t>(cuda_stream);
  const int64_t units = args.head_dim * args.element_size / unit_bytes;
  switch (unit_bytes) {
    case 16:
      kv_compact_kernel<uint4><<<blocks, kThreads, 0, stream>>>(args, units);
      break;
    case 4:
      kv_compact_kernel<uint32_t><<<blocks, kThreads, 0, stream>>>(args, units);
      break;
    default:
      kv_compact_kernel<uint16_t><<<blocks, kThreads, 0, stream>>>(args, units);
  }
  return static_cast<int>(cudaGetLastError());
}

int launch_advance_lengths(int64_t* lengths, const int64_t* keep, int64_t batch, int64_t max_keep,
                           const int32_t* error_flag, void* cuda_stream) {
  if (batch == 0) return 0;
  const int threads = 128;
  const int64_t blocks = (batch + threads - 1) / threads;
  advance_lengths_kernel<<<blocks, threads, 0, static_cast<cudaStream_t>(cuda_stream)>>>(lengths, keep, batch,
                                                                                        max_keep, error_flag);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace mtp
