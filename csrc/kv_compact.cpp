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
// CPU: parallel over (row, head). CUDA (built with -DMTP_WITH_CUDA): the kernels in kv_compact_cuda.cu,
// one copy launch for all caches. Includes only the ATen/torch headers the op needs, to keep the build
// short.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <Python.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "kv_compact.h"

#ifdef MTP_WITH_CUDA
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
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

std::string row_string(const int64_t* row, int64_t count) {
  std::ostringstream text;
  text << "[";
  for (int64_t i = 0; i < count; ++i) text << (i ? ", " : "") << row[i];
  text << "]";
  return text.str();
}

const char* describe(int32_t error) {
  switch (error) {
    case kBlockPastCache:
      return "length + block_size exceeds the cache's slots (or the length is negative)";
    case kKeepOutsideBlock:
      return "a kept index is outside the block";
    case kKeepNotIncreasing:
      return "kept indices must be strictly increasing";
    default:
      return "an index follows the -1 padding";
  }
}

void kv_compact_cpu(at::TensorList caches, const at::Tensor& lengths, const at::Tensor& keep, int64_t block_size) {
  check_inputs(caches, lengths, keep, block_size);
  const at::Tensor& first = caches[0];
  const int64_t batch = first.size(0), heads = first.size(1), slots = first.size(2);
  const int64_t max_keep = keep.size(1);
  int64_t* length_data = lengths.data_ptr<int64_t>();
  const int64_t* keep_data = keep.data_ptr<int64_t>();

  // Every row is checked before anything moves, so a bad row leaves caches and lengths untouched.
  std::vector<int64_t> kept(batch), in_place(batch);
  for (int64_t b = 0; b < batch; ++b) {
    const RowCheck check = check_row(keep_data + b * max_keep, max_keep, length_data[b], block_size, slots);
    TORCH_CHECK_VALUE(check.error == kOk, "kv_compact: row ", b, ": ", describe(check.error), " (length ",
                      length_data[b], ", block_size ", block_size, ", ", slots, " slots, keep[", b, "] = ",
                      row_string(keep_data + b * max_keep, max_keep), ")");
    kept[b] = check.kept;
    in_place[b] = check.in_place;
  }

  const int64_t element_size = first.element_size();
  const int64_t entry_bytes = first.size(3) * element_size;
  const int64_t stride_batch = first.stride(0) * element_size, stride_head = first.stride(1) * element_size,
                stride_slot = first.stride(2) * element_size;
  std::vector<char*> bases;
  for (const at::Tensor& cache : caches) bases.push_back(static_cast<char*>(cache.data_ptr()));

  // Entries of one (row, head) move in increasing order: entry i's target slot can only hold the source
  // of entry i or of an earlier one, so the copy is correct although sources and targets overlap.
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t work = begin; work < end; ++work) {
      const int64_t b = work / heads, h = work % heads;
      const int64_t* row = keep_data + b * max_keep;
      for (char* base : bases) {
        char* head_base = base + b * stride_batch + h * stride_head;
        for (int64_t i = in_place[b]; i < kept[b]; ++i) {
          std::memcpy(head_base + (length_data[b] + i) * stride_slot,
                      head_base + (length_data[b] + row[i]) * stride_slot, entry_bytes);
        }
      }
    }
  });
  for (int64_t b = 0; b < batch; ++b) length_data[b] += kept[b];
}

#ifdef MTP_WITH_CUDA
void kv_compact_cuda(at::TensorList caches, const at::Tensor& lengths, const at::Tensor& keep, int64_t block_size) {
  check_inputs(caches, lengths, keep, block_size);
  const at::Tensor& first = caches[0];
  const int64_t batch = first.size(0);
  if (batch == 0) return;
  TORCH_CHECK_VALUE(batch < INT32_MAX && keep.size(1) < INT32_MAX, "kv_compact: batch and keep.size(1) must fit int32");
  c10::cuda::CUDAGuard guard(first.device());

  std::vector<void*> pointers;
  for (const at::Tensor& cache : caches) pointers.push_back(cache.data_ptr());
  at::Tensor status = at::empty({2 + 2 * batch}, lengths.options().dtype(at::kInt));
  const int64_t element_size = first.element_size();

  KvCompactCudaArgs args;
  args.caches = pointers.data();
  args.num_caches = static_cast<int64_t>(pointers.size());
  args.batch = batch;
  args.heads = first.size(1);
  args.slots = first.size(2);
  args.entry_bytes = first.size(3) * element_size;
  args.stride_batch = first.stride(0) * element_size;
  args.stride_head = first.stride(1) * element_size;
  args.stride_slot = first.stride(2) * element_size;
  args.lengths = lengths.data_ptr<int64_t>();
  args.keep = keep.data_ptr<int64_t>();
  args.max_keep = keep.size(1);
  args.block_size = block_size;
  args.status = status.data_ptr<int32_t>();

  const int launch_error = launch_kv_compact(args, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(launch_error == 0, "kv_compact: CUDA launch failed: ", cuda_error_string(launch_error));
  // The op's one host sync: the value checks ran on the device and a bad row must raise here. (Generation
  // syncs every step anyway, to test whether all rows have finished.)
  const at::Tensor verdict = status.narrow(0, 0, 2).cpu();
  const int32_t error = verdict[0].item<int32_t>();
  if (error != kOk) {
    const int64_t row = verdict[1].item<int32_t>();
    const at::Tensor keep_row = keep[row].cpu();
    TORCH_CHECK_VALUE(false, "kv_compact: row ", row, ": ", describe(error), " (length ",
                      lengths[row].item<int64_t>(), ", block_size ", block_size, ", ", args.slots, " slots, keep[",
                      row, "] = ", row_string(keep_row.data_ptr<int64_t>(), keep_row.numel()), ")");
  }
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
