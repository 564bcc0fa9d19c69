// mtp_kernels._C: KV-cache compaction as the torch op `mtp_kernels::kv_compact`.
//
//   kv_compact(Tensor(a!)[] caches, Tensor(b!) lengths, Tensor keep, int block_size) -> ()
//
// caches: every layer's K and V, each [B, H, S, D] with the same shape, strides, dtype and device and a
// contiguous last dim. lengths [B] int64: each row's prefix length; this step's block of block_size
// entries sits at [lengths[b], lengths[b] + block_size). keep [B, K] int64: per row, strictly increasing
// indices into the block, padded with -1 at the end. Entry lengths[b] + keep[b, i] moves to slot
// lengths[b] + i of every cache, then lengths[b] grows by the number kept. Invalid input raises
// ValueError before anything is written.
//
// CPU: parallel over (row, head). CUDA (built with -DMTP_WITH_CUDA): one launch for all caches, kernel
// in kv_compact_cuda.cu. Includes only the ATen/torch headers the op needs, to keep the build short.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <Python.h>
#include <torch/library.h>

#include <cstring>
#include <string>
#include <vector>

#ifdef MTP_WITH_CUDA
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kv_compact.h"
#endif

namespace mtp {
namespace {

std::string shape_of(const at::Tensor& t) { return c10::str(t.sizes()); }

void check_inputs(at::TensorList caches, const at::Tensor& lengths, const at::Tensor& keep, int64_t block_size) {
  TORCH_CHECK_VALUE(!caches.empty(), "kv_compact: caches is empty");
  const at::Tensor& first = caches[0];
  TORCH_CHECK_VALUE(first.dim() == 4, "kv_compact: caches[0] must be [B, H, S, D], got ", shape_of(first));
  for (size_t c = 0; c < caches.size(); ++c) {
    const at::Tensor& cache = caches[c];
    TORCH_CHECK_VALUE(cache.sizes() == first.sizes() && cache.strides() == first.strides(), "kv_compact: caches[",
                      c, "] has shape ", shape_of(cache), " and strides ", c10::str(cache.strides()),
                      "; all caches must match caches[0] ", shape_of(first));
    TORCH_CHECK_VALUE(cache.scalar_type() == first.scalar_type(), "kv_compact: caches[", c, "] has dtype ",
                      cache.scalar_type(), " but caches[0] has ", first.scalar_type());
    TORCH_CHECK_VALUE(cache.device() == first.device(), "kv_compact: caches[", c, "] is on ", cache.device(),
                      " but caches[0] is on ", first.device());
    TORCH_CHECK_VALUE(cache.stride(3) == 1, "kv_compact: caches[", c, "] needs a contiguous last dim");
  }
  const int64_t batch = first.size(0);
  TORCH_CHECK_VALUE(lengths.dim() == 1 && lengths.size(0) == batch && lengths.scalar_type() == at::kLong,
                    "kv_compact: lengths must be int64 [", batch, "], got ", lengths.scalar_type(), " ",
                    shape_of(lengths));
  TORCH_CHECK_VALUE(keep.dim() == 2 && keep.size(0) == batch && keep.scalar_type() == at::kLong,
                    "kv_compact: keep must be int64 [", batch, ", K], got ", keep.scalar_type(), " ", shape_of(keep));
  TORCH_CHECK_VALUE(lengths.device() == first.device() && keep.device() == first.device(),
                    "kv_compact: lengths and keep must be on the caches' device ", first.device());
  TORCH_CHECK_VALUE(lengths.is_contiguous() && keep.is_contiguous(), "kv_compact: lengths and keep must be contiguous");
  TORCH_CHECK_VALUE(block_size >= 0, "kv_compact: block_size must be >= 0, got ", block_size);
  TORCH_CHECK_VALUE(keep.size(1) <= block_size, "kv_compact: keep has ", keep.size(1),
                    " columns but the block has only ", block_size, " entries");
}

// Validates every row first (so a bad row leaves all caches untouched) and returns the kept counts.
std::vector<int64_t> checked_kept_counts(const int64_t* lengths, const int64_t* keep, int64_t batch, int64_t max_keep,
                                         int64_t block_size, int64_t slots) {
  std::vector<int64_t> counts(batch, 0);
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK_VALUE(lengths[b] >= 0 && lengths[b] + block_size <= slots, "kv_compact: row ", b, " has length ",
                      lengths[b], "; length + block_size = ", lengths[b] + block_size, " exceeds the cache's ", slots,
                      " slots");
    const int64_t* row = keep + b * max_keep;
    int64_t count = 0;
    while (count < max_keep && row[count] >= 0) {
      TORCH_CHECK_VALUE(row[count] < block_size, "kv_compact: keep[", b, ", ", count, "] = ", row[count],
                        " is outside the block of ", block_size, " entries");
      TORCH_CHECK_VALUE(count == 0 || row[count] > row[count - 1], "kv_compact: keep[", b,
                        "] must be strictly increasing");
      ++count;
    }
    for (int64_t i = count; i < max_keep; ++i) {
      TORCH_CHECK_VALUE(row[i] < 0, "kv_compact: keep[", b, "] has an index after its -1 padding");
    }
    counts[b] = count;
  }
  return counts;
}

void kv_compact_cpu(at::TensorList caches, const at::Tensor& lengths, const at::Tensor& keep, int64_t block_size) {
  check_inputs(caches, lengths, keep, block_size);
  const at::Tensor& first = caches[0];
  const int64_t batch = first.size(0), heads = first.size(1), slots = first.size(2), head_dim = first.size(3);
  const int64_t max_keep = keep.size(1);
  int64_t* length_data = lengths.data_ptr<int64_t>();
  const int64_t* keep_data = keep.data_ptr<int64_t>();
  const std::vector<int64_t> counts = checked_kept_counts(length_data, keep_data, batch, max_keep, block_size, slots);

  const int64_t element_size = first.element_size();
  const int64_t entry_bytes = head_dim * element_size;
  const int64_t stride_batch = first.stride(0) * element_size, stride_head = first.stride(1) * element_size,
                stride_slot = first.stride(2) * element_size;
  std::vector<char*> bases;
  for (const at::Tensor& cache : caches) bases.push_back(static_cast<char*>(cache.data_ptr()));

  // Entries of one (row, head) move in increasing order: entry i's target slot can only hold the source
  // of an entry already moved, so the copy is correct although sources and targets overlap.
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t work = begin; work < end; ++work) {
      const int64_t b = work / heads, h = work % heads;
      const int64_t* row = keep_data + b * max_keep;
      for (char* base : bases) {
        char* head_base = base + b * stride_batch + h * stride_head;
        for (int64_t i = 0; i < counts[b]; ++i) {
          const int64_t source = length_data[b] + row[i], target = length_data[b] + i;
          if (source != target) {
            std::memcpy(head_base + target * stride_slot, head_base + source * stride_slot, entry_bytes);
          }
        }
      }
    }
  });
  for (int64_t b = 0; b < batch; ++b) length_data[b] += counts[b];
}

#ifdef MTP_WITH_CUDA
int widest_unit(at::TensorList caches) {
  const at::Tensor& first = caches[0];
  const int64_t element_size = first.element_size();
  for (int unit : {16, 4}) {
    bool fits = (first.size(3) * element_size) % unit == 0;
    for (int d = 0; d < 3; ++d) fits = fits && (first.stride(d) * element_size) % unit == 0;
    for (const at::Tensor& cache : caches) fits = fits && reinterpret_cast<uintptr_t>(cache.data_ptr()) % unit == 0;
    if (fits) return unit;
  }
  return 2;
}

void kv_compact_cuda(at::TensorList caches, const at::Tensor& lengths, const at::Tensor& keep, int64_t block_size) {
  check_inputs(caches, lengths, keep, block_size);
  const at::Tensor& first = caches[0];
  TORCH_CHECK_VALUE(first.element_size() == 2 || first.element_size() == 4,
                    "kv_compact: CUDA caches must have 2- or 4-byte elements, got ", first.scalar_type());
  c10::cuda::CUDAGuard guard(first.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  std::vector<int64_t> pointers;
  for (const at::Tensor& cache : caches) pointers.push_back(reinterpret_cast<int64_t>(cache.data_ptr()));
  at::Tensor host_pointers = at::empty({static_cast<int64_t>(pointers.size())}, at::kLong);
  std::memcpy(host_pointers.data_ptr<int64_t>(), pointers.data(), pointers.size() * sizeof(int64_t));
  at::Tensor device_pointers = host_pointers.to(first.device());
  at::Tensor error = at::zeros({1}, first.options().dtype(at::kInt));

  KvCompactArgs args;
  args.caches = reinterpret_cast<void* const*>(device_pointers.data_ptr<int64_t>());
  args.num_caches = static_cast<int64_t>(caches.size());
  args.batch = first.size(0);
  args.heads = first.size(1);
  args.slots = first.size(2);
  args.head_dim = first.size(3);
  args.stride_batch = first.stride(0);
  args.stride_head = first.stride(1);
  args.stride_slot = first.stride(2);
  args.element_size = first.element_size();
  args.lengths = lengths.data_ptr<int64_t>();
  args.keep = keep.data_ptr<int64_t>();
  args.max_keep = keep.size(1);
  args.block_size = block_size;
  args.error_flag = error.data_ptr<int32_t>();

  int status = launch_kv_compact(args, widest_unit(caches), stream);
  TORCH_CHECK(status == 0, "kv_compact: CUDA launch failed with error ", status);
  status = launch_advance_lengths(lengths.data_ptr<int64_t>(), args.keep, args.batch, args.max_keep, args.error_flag,
                                  stream);
  TORCH_CHECK(status == 0, "kv_compact: CUDA launch failed with error ", status);
  // Reading the flag waits for the copy; generation synchronises once per step anyway to decide stopping.
  const int32_t code = error.item<int32_t>();
  TORCH_CHECK_VALUE(code == 0, "kv_compact: ",
                    code == 1   ? "a kept index is outside the block"
                    : code == 2 ? "keep rows must be strictly increasing with -1 padding at the end"
                                : "length + block_size exceeds the cache");
}
#endif

}  // namespace
}  // namespace mtp

TORCH_LIBRARY(mtp_kernels, m) {
  m.def("kv_compact(Tensor(a!)[] caches, Tensor(b!) lengths, Tensor keep, int block_size) -> ()");
}

TORCH_LIBRARY_IMPL(mtp_kernels, CPU, m) { m.impl("kv_compact", &mtp::kv_compact_cpu); }

#ifdef MTP_WITH_CUDA
TORCH_LIBRARY_IMPL(mtp_kernels, CUDA, m) { m.impl("kv_compact", &mtp::kv_compact_cuda); }
#endif

// Importing mtp_kernels._C from Python loads this library, which runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "mtp_kernels compiled ops (torch.ops.mtp_kernels)", -1,
                               nullptr};
  return PyModule_Create(&module);
}
