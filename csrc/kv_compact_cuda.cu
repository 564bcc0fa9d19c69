// CUDA KV-cache compaction (contract in kv_compact.h): a one-block validation launch, then one copy
// launch for every layer's K and V.
//
// Free of torch headers so that `nvcc -c` checks it on a machine whose torch is a CPU build; the host
// glue that gets the stream and the pointers lives in kv_compact.cpp.
//
// Why no barrier is needed although sources and targets overlap: each copy thread owns one column of
// `Unit`s (one cache, row, head and offset within the entry) and moves that column for every kept entry
// of the row. Entry i is stored to slot start + i, and the only entry reading that slot is the one with
// keep = i, which is entry i itself or an earlier one; a later entry m reads start + keep[m] >=
// start + m > start + i. So per column it suffices that each entry is loaded no later than stored, in
// increasing i, which one thread's program order gives. Within a stage the thread loads up to kStage
// entries before storing any, to keep several loads in flight.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "kv_compact.h"

namespace mtp {
namespace {

constexpr int kCheckThreads = 256;
constexpr int kCopyThreads = 256;
constexpr int64_t kMaxCopyBlocks = 1 << 16;  // a grid-stride loop covers the rest
constexpr int kStage = 8;                    // kept entries loaded per column before storing them
// Base pointers travel in the kernel's parameters (2 KiB of the 4 KiB limit), so no host-to-device copy
// precedes the launch; Llama-3-70B's 80 layers are 160 caches, one launch.
constexpr int kMaxCachesPerLaunch = 256;

struct CacheBases {
  char* data[kMaxCachesPerLaunch];
};

struct CopyLayout {
  int64_t batch, heads, units_per_entry;
  int64_t stride_batch, stride_head, stride_slot;  // in bytes
  int64_t max_keep;
};

// One block: validates every row, records the first bad row's error, and advances the lengths only when
// every row is valid (so a bad row leaves lengths and caches untouched).
__global__ void __launch_bounds__(kCheckThreads)
    kv_compact_check_kernel(int64_t* lengths, const int64_t* keep, int64_t batch, int64_t max_keep,
                            int64_t block_size, int64_t slots, int32_t* status) {
  __shared__ int first_bad_row;
  if (threadIdx.x == 0) first_bad_row = INT_MAX;
  __syncthreads();

  int my_bad_row = INT_MAX;
  int32_t my_error = kOk;
  for (int64_t row = threadIdx.x; row < batch; row += blockDim.x) {
    const RowCheck check = check_row(keep + row * max_keep, max_keep, lengths[row], block_size, slots);
    status[2 + row] = static_cast<int32_t>(check.kept);
    status[2 + batch + row] = static_cast<int32_t>(check.in_place);
    if (check.error != kOk && my_error == kOk) {  // rows rise, so the first is this thread's lowest
      my_error = check.error;
      my_bad_row = static_cast<int>(row);
    }
  }
  if (my_error != kOk) atomicMin(&first_bad_row, my_bad_row);
  __syncthreads();

  if (first_bad_row == INT_MAX) {
    // Each thread advances the rows it counted, reading back its own writes.
    for (int64_t row = threadIdx.x; row < batch; row += blockDim.x) lengths[row] += status[2 + row];
    if (threadIdx.x == 0) {
      status[0] = kOk;
      status[1] = -1;
    }
  } else if (my_bad_row == first_bad_row) {
    status[0] = my_error;
    status[1] = my_bad_row;
  }
}

template <typename Unit>
__global__ void __launch_bounds__(kCopyThreads)
    kv_compact_copy_kernel(CacheBases bases, int64_t num_caches, CopyLayout layout, const int64_t* lengths,
                           const int64_t* keep, const int32_t* status) {
  if (status[0] != kOk) return;
  const int64_t total = num_caches * layout.batch * layout.heads * layout.units_per_entry;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; index < total;
       index += step) {
    const int64_t unit = index % layout.units_per_entry;
    int64_t rest = index / layout.units_per_entry;
    const int64_t head = rest % layout.heads;
    rest /= layout.heads;
    const int64_t row = rest % layout.batch;
    const int64_t cache = rest / layout.batch;

    const int64_t kept = status[2 + row];
    const int64_t in_place = status[2 + layout.batch + row];
    if (in_place == kept) continue;             // e.g. after a prefill, which keeps the whole prompt
    const int64_t start = lengths[row] - kept;  // the check kernel has advanced the lengths already
    const int64_t* keep_row = keep + row * layout.max_keep;
    char* column =
        bases.data[cache] + row * layout.stride_batch + head * layout.stride_head + unit * sizeof(Unit);

    for (int64_t first = in_place; first < kept; first += kStage) {
      Unit staged[kStage];
      int64_t source[kStage];
#pragma unroll
      for (int s = 0; s < kStage; ++s) {
        const int64_t i = first + s;
        source[s] = i < kept ? keep_row[i] : i;  // an entry already in its slot does not move
      }
#pragma unroll
      for (int s = 0; s < kStage; ++s) {
        if (source[s] != first + s) {
          staged[s] = *reinterpret_cast<const Unit*>(column + (start + source[s]) * layout.stride_slot);
        }
      }
#pragma unroll
      for (int s = 0; s < kStage; ++s) {
        const int64_t i = first + s;
        if (source[s] != i) *reinterpret_cast<Unit*>(column + (start + i) * layout.stride_slot) = staged[s];
      }
    }
  }
}

// The widest copy unit that every entry start is aligned to.
int widest_unit(const KvCompactCudaArgs& args) {
  for (int unit : {16, 8, 4, 2}) {
    bool fits = args.entry_bytes % unit == 0 && args.stride_batch % unit == 0 && args.stride_head % unit == 0 &&
                args.stride_slot % unit == 0;
    for (int64_t c = 0; fits && c < args.num_caches; ++c) {
      fits = reinterpret_cast<uintptr_t>(args.caches[c]) % unit == 0;
    }
    if (fits) return unit;
  }
  return 1;
}

template <typename Unit>
cudaError_t launch_copies(const KvCompactCudaArgs& args, cudaStream_t stream) {
  CopyLayout layout;
  layout.batch = args.batch;
  layout.heads = args.heads;
  layout.units_per_entry = args.entry_bytes / static_cast<int64_t>(sizeof(Unit));
  layout.stride_batch = args.stride_batch;
  layout.stride_head = args.stride_head;
  layout.stride_slot = args.stride_slot;
  layout.max_keep = args.max_keep;

  for (int64_t first = 0; first < args.num_caches; first += kMaxCachesPerLaunch) {
    const int64_t count =
        args.num_caches - first < kMaxCachesPerLaunch ? args.num_caches - first : kMaxCachesPerLaunch;
    CacheBases bases;
    for (int64_t c = 0; c < count; ++c) bases.data[c] = static_cast<char*>(args.caches[first + c]);
    const int64_t threads_needed = count * layout.batch * layout.heads * layout.units_per_entry;
    int64_t blocks = (threads_needed + kCopyThreads - 1) / kCopyThreads;
    if (blocks > kMaxCopyBlocks) blocks = kMaxCopyBlocks;
    kv_compact_copy_kernel<Unit><<<static_cast<unsigned>(blocks), kCopyThreads, 0, stream>>>(
        bases, count, layout, args.lengths, args.keep, args.status);
    const cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) return error;
  }
  return cudaSuccess;
}

}  // namespace

int launch_kv_compact(const KvCompactCudaArgs& args, void* cuda_stream) {
  cudaStream_t stream = static_cast<cudaStream_t>(cuda_stream);
  kv_compact_check_kernel<<<1, kCheckThreads, 0, stream>>>(args.lengths, args.keep, args.batch, args.max_keep,
                                                           args.block_size, args.slots, args.status);
  cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) return static_cast<int>(error);
  if (args.max_keep == 0 || args.heads == 0 || args.entry_bytes == 0) return 0;  // nothing can move

  switch (widest_unit(args)) {
    case 16:
      error = launch_copies<uint4>(args, stream);
      break;
    case 8:
      error = launch_copies<uint2>(args, stream);
      break;
    case 4:
      error = launch_copies<uint32_t>(args, stream);
      break;
    case 2:
      error = launch_copies<uint16_t>(args, stream);
      break;
    default:
      error = launch_copies<uint8_t>(args, stream);
  }
  return static_cast<int>(error);
}

const char* cuda_error_string(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

}  // namespace mtp
