// cuDNN's fused flash attention through its backend graph API
// (include/pion/cuda/cudnn_attention.h).
//
// cuDNN recognises scaled-dot-product attention as a fixed pattern of matmul, pointwise and
// reduction operations and runs the whole pattern as one fused kernel; nothing of the T x T
// scores is stored. The graphs below are that pattern for causal bf16 training attention with
// the softmax statistics kept: the one cudnn-frontend builds for it with cuDNN 9 (its
// "composite" SDPA nodes), written against the C API so that no header-only library has to be
// vendored. Every descriptor is an RAII Descriptor; plans are built once per shape.
#include "pion/cuda/cudnn_attention.h"

#if PION_HAVE_CUDNN
#include <cudnn.h>

#include <array>
#include <limits>
#include <vector>

#include "../context.cuh"
#include "pion/core/error.h"

static_assert(CUDNN_MAJOR >= 9, "the fused attention graphs need cuDNN 9's backend API");

namespace pion::cuda::layers {
namespace {

using i64 = std::int64_t;

void check_cudnn(cudnnStatus_t s, const char* call) {
  if (s == CUDNN_STATUS_SUCCESS) return;
  std::array<char, 1024> detail{};
  cudnnGetLastErrorString(detail.data(), detail.size());
  throw Error(std::string("cudnn: ") + call + " failed: " + cudnnGetErrorString(s) +
              (detail[0] != '\0' ? std::string(" (") + detail.data() + ")" : std::string()));
}
#define PION_CUDNN_CHECK(call) check_cudnn((call), #call)

// One cudnnBackendDescriptor_t, destroyed with its owner; set() is chainable.
class Descriptor {
 public:
  explicit Descriptor(cudnnBackendDescriptorType_t type) {
    PION_CUDNN_CHECK(cudnnBackendCreateDescriptor(type, &d_));
  }
  ~Descriptor() {
    if (d_ != nullptr) cudnnBackendDestroyDescriptor(d_);
  }
  Descriptor(Descriptor&& o) noexcept : d_(o.d_) { o.d_ = nullptr; }
  Descriptor& operator=(Descriptor&&) = delete;
  Descriptor(const Descriptor&) = delete;
  Descriptor& operator=(const Descriptor&) = delete;

  cudnnBackendDescriptor_t get() const { return d_; }
  Descriptor& set(cudnnBackendAttributeName_t name, cudnnBackendAttributeType_t type, i64 count,
                  const void* values) {
    PION_CUDNN_CHECK(cudnnBackendSetAttribute(d_, name, type, count, values));
    return *this;
  }
  Descriptor& set_i64(cudnnBackendAttributeName_t name, i64 value) {
    return set(name, CUDNN_TYPE_INT64, 1, &value);
  }
  Descriptor& set_i64s(cudnnBackendAttributeName_t name, const std::vector<i64>& values) {
    return set(name, CUDNN_TYPE_INT64, static_cast<i64>(values.size()), values.data());
  }
  Descriptor& set_type(cudnnBackendAttributeName_t name, cudnnDataType_t type) {
    return set(name, CUDNN_TYPE_DATA_TYPE, 1, &type);
  }
  Descriptor& set_bool(cudnnBackendAttributeName_t name, bool value) {
    return set(name, CUDNN_TYPE_BOOLEAN, 1, &value);
  }
  Descriptor& set_desc(cudnnBackendAttributeName_t name, const Descriptor& value) {
    cudnnBackendDescriptor_t raw = value.get();
    return set(name, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &raw);
  }
  Descriptor& finalize() {
    PION_CUDNN_CHECK(cudnnBackendFinalize(d_));
    return *this;
  }

 private:
  cudnnBackendDescriptor_t d_ = nullptr;
};

// Row-major strides of a packed tensor with these dimensions.
std::vector<i64> packed_strides(const std::vector<i64>& dims) {
  std::vector<i64> strides(dims.size(), 1);
  for (std::size_t i = dims.size() - 1; i > 0; --i) strides[i - 1] = strides[i] * dims[i];
  return strides;
}

// The tensors and operations of one operation graph. Tensors the caller passes data for have
// fixed unique ids (Uid); virtual ones (intermediates that live only inside the fused kernel)
// are numbered from 1000.
class GraphBuilder {
 public:
  const Descriptor& tensor(i64 uid, cudnnDataType_t type, std::vector<i64> dims,
                           std::vector<i64> strides, bool is_virtual = false,
                           bool by_value = false) {
    Descriptor t(CUDNN_BACKEND_TENSOR_DESCRIPTOR);
    t.set_i64(CUDNN_ATTR_TENSOR_UNIQUE_ID, uid)
        .set_type(CUDNN_ATTR_TENSOR_DATA_TYPE, type)
        .set_i64s(CUDNN_ATTR_TENSOR_DIMENSIONS, dims)
        .set_i64s(CUDNN_ATTR_TENSOR_STRIDES, strides)
        .set_i64(CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, 16)
        .set_bool(CUDNN_ATTR_TENSOR_IS_VIRTUAL, is_virtual);
    if (by_value) t.set_bool(CUDNN_ATTR_TENSOR_IS_BY_VALUE, true);
    return keep(std::move(t.finalize()));
  }
  // A by-value fp32 scalar ([1, 1, 1, 1]); its value is passed at execution.
  const Descriptor& scalar(i64 uid) {
    return tensor(uid, CUDNN_DATA_FLOAT, {1, 1, 1, 1}, {1, 1, 1, 1}, false, true);
  }
  const Descriptor& virtual_tensor(cudnnDataType_t type, const std::vector<i64>& dims) {
    return tensor(next_virtual_++, type, dims, packed_strides(dims), true);
  }

  void matmul(const Descriptor& a, const Descriptor& b, const Descriptor& c) {
    Descriptor desc(CUDNN_BACKEND_MATMUL_DESCRIPTOR);
    desc.set_type(CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_DATA_FLOAT).finalize();
    Descriptor op(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR);
    op.set_desc(CUDNN_ATTR_OPERATION_MATMUL_ADESC, a)
        .set_desc(CUDNN_ATTR_OPERATION_MATMUL_BDESC, b)
        .set_desc(CUDNN_ATTR_OPERATION_MATMUL_CDESC, c)
        .set_desc(CUDNN_ATTR_OPERATION_MATMUL_DESC, desc)
        .finalize();
    keep(std::move(desc));
    ops_.push_back(std::move(op));
  }
  // y = mode(x[, b][, t]); axis only for GEN_INDEX.
  // math: the comparison's BOOLEAN, else FLOAT.
  void pointwise(cudnnPointwiseMode_t mode, const Descriptor& x, const Descriptor* b,
                 const Descriptor& y, const Descriptor* t = nullptr, i64 axis = -1,
                 cudnnDataType_t math = CUDNN_DATA_FLOAT) {
    Descriptor desc(CUDNN_BACKEND_POINTWISE_DESCRIPTOR);
    desc.set(CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode)
        .set_type(CUDNN_ATTR_POINTWISE_MATH_PREC, math);
    if (axis >= 0) desc.set_i64(CUDNN_ATTR_POINTWISE_AXIS, axis);
    desc.finalize();
    Descriptor op(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR);
    op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, desc)
        .set_desc(CUDNN_ATTR_OPERATION_POINTWISE_XDESC, x)
        .set_desc(CUDNN_ATTR_OPERATION_POINTWISE_YDESC, y);
    if (b != nullptr) op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_BDESC, *b);
    if (t != nullptr) op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_TDESC, *t);
    const float one = 1.0f;
    op.set(CUDNN_ATTR_OPERATION_POINTWISE_ALPHA1, CUDNN_TYPE_FLOAT, 1, &one)
        .set(CUDNN_ATTR_OPERATION_POINTWISE_ALPHA2, CUDNN_TYPE_FLOAT, 1, &one)
        .finalize();
    keep(std::move(desc));
    ops_.push_back(std::move(op));
  }
  // y = reduce(x) over the dimensions where y has extent 1.
  void reduction(cudnnReduceTensorOp_t reduce, const Descriptor& x, const Descriptor& y) {
    Descriptor desc(CUDNN_BACKEND_REDUCTION_DESCRIPTOR);
    desc.set_type(CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_DATA_FLOAT)
        .set(CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1, &reduce);
#if CUDNN_VERSION >= 91100
    desc.set_bool(CUDNN_ATTR_REDUCTION_IS_DETERMINISTIC, false);
#endif
    desc.finalize();
    Descriptor op(CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR);
    op.set_desc(CUDNN_ATTR_OPERATION_REDUCTION_XDESC, x)
        .set_desc(CUDNN_ATTR_OPERATION_REDUCTION_YDESC, y)
        .set_desc(CUDNN_ATTR_OPERATION_REDUCTION_DESC, desc)
        .finalize();
    keep(std::move(desc));
    ops_.push_back(std::move(op));
  }

  // y = x with y's type and strides: how the pattern transposes P and dS (and widens K).
  void reshape(const Descriptor& x, const Descriptor& y) {
    Descriptor op(CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR);
    op.set_desc(CUDNN_ATTR_OPERATION_RESHAPE_XDESC, x)
        .set_desc(CUDNN_ATTR_OPERATION_RESHAPE_YDESC, y)
        .finalize();
    ops_.push_back(std::move(op));
  }
  // A virtual tensor with explicit strides (a transposed view).
  const Descriptor& virtual_strided(cudnnDataType_t type, const std::vector<i64>& dims,
                                    const std::vector<i64>& strides) {
    return tensor(next_virtual_++, type, dims, strides, true);
  }

  const std::vector<Descriptor>& ops() const {
    return ops_;
  }

 private:
  const Descriptor& keep(Descriptor d) {
    kept_.push_back(std::make_unique<Descriptor>(std::move(d)));
    return *kept_.back();
  }
  std::vector<std::unique_ptr<Descriptor>> kept_;  // stable addresses: ops point at them
  std::vector<Descriptor> ops_;
  i64 next_virtual_ = 1000;
};

// An operation graph finalised into an execution plan: the first engine configuration of
// cuDNN's heuristics (mode A, then the fallback list) that finalises, with its workspace size.
struct Plan {
  // Declared in the order they refer to each other, so each outlives what points at it: the
  // graph's tensors and operations, the graph, the engine configurations, the plan.
  GraphBuilder builder;
  std::unique_ptr<Descriptor> graph;
  std::vector<std::unique_ptr<Descriptor>> configs;  // the plan refers to one of them
  std::unique_ptr<Descriptor> plan;
  std::size_t workspace = 0;
  std::string engine;

  // The operation graph alone: cuDNN checks its operations' shapes and types (no GPU needed
  // without a handle, since cuDNN 9.8).
  static std::unique_ptr<Descriptor> operation_graph(cudnnHandle_t handle, const GraphBuilder& g) {
    auto graph = std::make_unique<Descriptor>(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR);
    std::vector<cudnnBackendDescriptor_t> raw;
    for (const Descriptor& op : g.ops()) raw.push_back(op.get());
    if (handle != nullptr)
      graph->set(CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle);
    graph
        ->set(CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR,
              static_cast<i64>(raw.size()), raw.data())
        .finalize();
    return graph;
  }

  Plan(cudnnHandle_t handle, GraphBuilder g, const char* what) : builder(std::move(g)) {
    graph = operation_graph(handle, builder);
    std::string tried;
    for (cudnnBackendHeurMode_t mode : {CUDNN_HEUR_MODE_A, CUDNN_HEUR_MODE_FALLBACK}) {
      Descriptor heur(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR);
      heur.set_desc(CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, *graph)
          .set(CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode);
      if (cudnnBackendFinalize(heur.get()) != CUDNN_STATUS_SUCCESS) {
        tried += std::string(tried.empty() ? "" : "; ") + "heuristics mode " +
                 std::to_string(static_cast<int>(mode)) + " found no engine";
        continue;
      }
      i64 count = 0;
      PION_CUDNN_CHECK(cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                                CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &count, nullptr));
      std::vector<std::unique_ptr<Descriptor>> found;
      std::vector<cudnnBackendDescriptor_t> found_raw;
      for (i64 i = 0; i < count; ++i) {
        found.push_back(std::make_unique<Descriptor>(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR));
        found_raw.push_back(found.back()->get());
      }
      i64 returned = 0;
      PION_CUDNN_CHECK(cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                                CUDNN_TYPE_BACKEND_DESCRIPTOR, count, &returned,
                                                found_raw.data()));
      for (i64 i = 0; i < returned; ++i) {
        auto candidate = std::make_unique<Descriptor>(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR);
        candidate->set(CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle)
            .set_desc(CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, *found[static_cast<std::size_t>(i)]);
        const cudnnStatus_t s = cudnnBackendFinalize(candidate->get());
        if (s != CUDNN_STATUS_SUCCESS) {
          tried += std::string(tried.empty() ? "" : "; ") + "engine config " + std::to_string(i) +
                   ": " + cudnnGetErrorString(s);
          continue;
        }
        i64 bytes = 0, n = 0;
        PION_CUDNN_CHECK(cudnnBackendGetAttribute(candidate->get(),
                                                  CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
                                                  CUDNN_TYPE_INT64, 1, &n, &bytes));
        workspace = static_cast<std::size_t>(bytes);
        engine = engine_name(*found[static_cast<std::size_t>(i)]);
        plan = std::move(candidate);
        configs = std::move(found);
        return;
      }
    }
    throw Error(std::string("cudnn: no engine runs the fused attention ") + what +
                " graph on this GPU and cuDNN " + std::to_string(cudnnGetVersion()) + " (" + tried +
                "); use --attention flash");
  }

  static std::string engine_name(const Descriptor& config) {
    Descriptor engine(CUDNN_BACKEND_ENGINE_DESCRIPTOR);
    cudnnBackendDescriptor_t raw = engine.get();
    i64 n = 0, index = -1;
    if (cudnnBackendGetAttribute(config.get(), CUDNN_ATTR_ENGINECFG_ENGINE,
                                 CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &n,
                                 &raw) == CUDNN_STATUS_SUCCESS &&
        cudnnBackendGetAttribute(raw, CUDNN_ATTR_ENGINE_GLOBAL_INDEX, CUDNN_TYPE_INT64, 1, &n,
                                 &index) == CUDNN_STATUS_SUCCESS)
      return "engine " + std::to_string(index);
    return "engine ?";
  }

  // Runs the plan on the handle's stream with these tensors (unique id -> pointer).
  void execute(cudnnHandle_t handle, const std::vector<i64>& uids, std::vector<void*> pointers,
               void* scratch) const {
    Descriptor pack(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR);
    pack.set(CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, static_cast<i64>(uids.size()),
             uids.data())
        .set(CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR,
             static_cast<i64>(pointers.size()), pointers.data())
        .set(CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &scratch)
        .finalize();
    PION_CUDNN_CHECK(cudnnBackendExecute(handle, plan->get(), pack.get()));
  }
};

}  // namespace

std::string cudnn_attention_unavailable() {
  return {};
}

namespace {

// Unique ids of the tensors the caller passes data for.
enum Uid : i64 {
  kQ = 1,
  kK,
  kV,
  kO,
  kStats,
  kScale,
  kMaskFill,
  kDO,
  kDQ,
  kDK,
  kDV,
  kSoftmaxSum,
  kOne,
  kDQAccum
};

// The shape of one attention call and the strides of its tensors inside the packed buffers.
struct Layout {
  i64 b, s, h, hd, kvh;
  i64 width() const { return (h + 2 * kvh) * hd; }  // a [q | k | v] row
  // Q (and dQ) of [batch, seq, width] rows: head j at column j * head_dim.
  std::vector<i64> q_dims() const { return {b, h, s, hd}; }
  std::vector<i64> q_strides() const { return {s * width(), hd, width(), 1}; }
  std::vector<i64> kv_dims() const { return {b, kvh, s, hd}; }
  std::vector<i64> kv_strides() const { return q_strides(); }
  // K^T for S = Q K^T: the last two dimensions of K swapped.
  std::vector<i64> kt_dims() const { return {b, kvh, hd, s}; }
  std::vector<i64> kt_strides() const { return {s * width(), hd, 1, width()}; }
  // O and dO: [batch, seq, n_head head_dim] rows.
  std::vector<i64> o_strides() const { return {s * h * hd, hd, h * hd, 1}; }
  std::vector<i64> row_dims() const { return {b, h, s, 1}; }  // stats, row sums
  std::vector<i64> row_strides() const { return {h * s, s, 1, 1}; }
  std::vector<i64> score_dims() const { return {b, h, s, s}; }
  // Element offsets of K and V in a row.
  i64 k_offset() const { return h * hd; }
  i64 v_offset() const { return (h + kvh) * hd; }
};

// Causal mask: keep key j <= query i (row index >= column index), else the fill value (-inf,
// a by-value scalar), so that exp() gives 0 there.
const Descriptor& causal_mask(GraphBuilder& g, const Layout& l, const Descriptor& scores) {
  const Descriptor& row = g.virtual_tensor(CUDNN_DATA_INT32, l.score_dims());
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, scores, nullptr, row, nullptr, 2);
  const Descriptor& col = g.virtual_tensor(CUDNN_DATA_INT32, l.score_dims());
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, scores, nullptr, col, nullptr, 3);
  const Descriptor& keep = g.virtual_tensor(CUDNN_DATA_BOOLEAN, l.score_dims());
  g.pointwise(CUDNN_POINTWISE_CMP_GE, row, &col, keep, nullptr, -1, CUDNN_DATA_BOOLEAN);
  const Descriptor& fill = g.scalar(kMaskFill);
  const Descriptor& masked = g.virtual_tensor(CUDNN_DATA_FLOAT, l.score_dims());
  g.pointwise(CUDNN_POINTWISE_BINARY_SELECT, scores, &fill, masked, &keep);
  return masked;
}

// scale * Q K^T (fp32, virtual): the scores the forward and the backward both start from.
const Descriptor& scaled_scores(GraphBuilder& g, const Layout& l, const Descriptor& q,
                                const Descriptor& kt) {
  const Descriptor& s = g.virtual_tensor(CUDNN_DATA_FLOAT, l.score_dims());
  g.matmul(q, kt, s);
  const Descriptor& scale = g.scalar(kScale);
  const Descriptor& scaled = g.virtual_tensor(CUDNN_DATA_FLOAT, l.score_dims());
  g.pointwise(CUDNN_POINTWISE_MUL, s, &scale, scaled);
  return scaled;
}

// O = softmax(masked scores) V and Stats = the rows' logsumexp.
GraphBuilder forward_graph(const Layout& l) {
  const auto F = CUDNN_DATA_FLOAT, B = CUDNN_DATA_BFLOAT16;
  GraphBuilder g;
  const Descriptor& q = g.tensor(kQ, B, l.q_dims(), l.q_strides());
  const Descriptor& kt = g.tensor(kK, B, l.kt_dims(), l.kt_strides());
  const Descriptor& v = g.tensor(kV, B, l.kv_dims(), l.kv_strides());
  const Descriptor& s = causal_mask(g, l, scaled_scores(g, l, q, kt));
  const Descriptor& max = g.virtual_tensor(F, l.row_dims());
  g.reduction(CUDNN_REDUCE_TENSOR_MAX, s, max);
  const Descriptor& shifted = g.virtual_tensor(F, l.score_dims());
  g.pointwise(CUDNN_POINTWISE_SUB, s, &max, shifted);
  const Descriptor& e = g.virtual_tensor(F, l.score_dims());
  g.pointwise(CUDNN_POINTWISE_EXP, shifted, nullptr, e);
  const Descriptor& sum = g.virtual_tensor(F, l.row_dims());
  g.reduction(CUDNN_REDUCE_TENSOR_ADD, e, sum);
  const Descriptor& log_sum = g.virtual_tensor(F, l.row_dims());
  g.pointwise(CUDNN_POINTWISE_LOG, sum, nullptr, log_sum);
  const Descriptor& stats = g.tensor(kStats, F, l.row_dims(), l.row_strides());
  g.pointwise(CUDNN_POINTWISE_ADD, max, &log_sum, stats);
  const Descriptor& p = g.virtual_tensor(B, l.score_dims());  // bmm2's A: the i/o type
  g.pointwise(CUDNN_POINTWISE_DIV, e, &sum, p);
  const Descriptor& o = g.tensor(kO, B, l.q_dims(), l.o_strides());
  g.matmul(p, v, o);
  return g;
}

// The backward's own fp32 tensors at the start of its workspace (each region 256-byte
// aligned): dQ accumulated in fp32 [b, h, s, hd] (then cast to bf16 dQ), and the row dots
// softmax_sum_i = dO_i . O_i [b, h, s, 1]. cuDNN's engine workspace follows.
std::size_t aligned(std::size_t bytes) {
  return (bytes + 255) / 256 * 256;
}
std::size_t dq_accum_bytes(const Layout& l) {
  return aligned(static_cast<std::size_t>(l.b * l.h * l.s * l.hd) * sizeof(float));
}
std::size_t softmax_sum_bytes(const Layout& l) {
  return aligned(static_cast<std::size_t>(l.b * l.h * l.s) * sizeof(float));
}
std::size_t backward_extra_bytes(const Layout& l) {
  return dq_accum_bytes(l) + softmax_sum_bytes(l);
}

// dV = P^T dO, dP = dO V^T, dS = scale P (dP - rowdot(dO, O)), dK = dS^T Q, dQ = dS K, with P
// recomputed from the scores and the forward's stats. With grouped-query attention dK and dV
// are formed per query head (bf16) and summed over each K/V head's group.
GraphBuilder backward_graph(const Layout& l) {
  const auto F = CUDNN_DATA_FLOAT, B = CUDNN_DATA_BFLOAT16;
  const bool grouped = l.kvh != l.h;
  GraphBuilder g;
  const Descriptor& q = g.tensor(kQ, B, l.q_dims(), l.q_strides());
  const Descriptor& kt = g.tensor(kK, B, l.kt_dims(), l.kt_strides());
  const Descriptor& vt = g.tensor(kV, B, l.kt_dims(), l.kt_strides());
  const Descriptor& o = g.tensor(kO, B, l.q_dims(), l.o_strides());
  const Descriptor& d_o = g.tensor(kDO, B, l.q_dims(), l.o_strides());
  const Descriptor& stats = g.tensor(kStats, F, l.row_dims(), l.row_strides());
  // softmax_sum = rowdot(dO, O) (times 1: the dropout scale's place).
  const Descriptor& prod =
      g.virtual_strided(F, l.q_dims(), {l.h * l.s * l.hd, l.s * l.hd, l.h * l.hd, 1});
  g.pointwise(CUDNN_POINTWISE_MUL, d_o, &o, prod);
  const Descriptor& rowdot = g.virtual_tensor(F, l.row_dims());
  g.reduction(CUDNN_REDUCE_TENSOR_ADD, prod, rowdot);
  const Descriptor& one = g.scalar(kOne);
  const Descriptor& softmax_sum = g.tensor(kSoftmaxSum, F, l.row_dims(), l.row_strides());
  g.pointwise(CUDNN_POINTWISE_MUL, rowdot, &one, softmax_sum);
  // P = exp(mask(scale Q K^T - stats)).
  const Descriptor& shifted = g.virtual_tensor(F, l.score_dims());
  g.pointwise(CUDNN_POINTWISE_SUB, scaled_scores(g, l, q, kt), &stats, shifted);
  const Descriptor& masked = causal_mask(g, l, shifted);
  const Descriptor& p = g.virtual_tensor(F, l.score_dims());
  g.pointwise(CUDNN_POINTWISE_EXP, masked, nullptr, p);
  // Transposed bf16 views of P and dS: [b, h, s_kv, s_q] over the same row-major scores.
  const std::vector<i64> t_dims = {l.b, l.h, l.s, l.s};
  const std::vector<i64> t_strides = {l.h * l.s * l.s, l.s * l.s, 1, l.s};
  const std::vector<i64> full_dims = {l.b, l.h, l.s, l.hd};
  // dV, and dK below: written directly, or per query head then summed over the group.
  const auto grad_kv = [&](const Descriptor& a, const Descriptor& b_operand, Uid uid) {
    const Descriptor& out = g.tensor(uid, B, l.kv_dims(), l.kv_strides());
    if (!grouped) {
      g.matmul(a, b_operand, out);
      return;
    }
    const Descriptor& per_head = g.virtual_tensor(B, full_dims);
    g.matmul(a, b_operand, per_head);
    g.reduction(CUDNN_REDUCE_TENSOR_ADD, per_head, out);
  };
  const Descriptor& pt = g.virtual_strided(B, t_dims, t_strides);
  g.reshape(p, pt);
  grad_kv(pt, d_o, kDV);
  const Descriptor& dp = g.virtual_tensor(F, l.score_dims());
  g.matmul(d_o, vt, dp);
  const Descriptor& centred = g.virtual_tensor(F, l.score_dims());
  g.pointwise(CUDNN_POINTWISE_SUB, dp, &softmax_sum, centred);
  const Descriptor& weighted = g.virtual_tensor(F, l.score_dims());
  g.pointwise(CUDNN_POINTWISE_MUL, centred, &p, weighted);
  const Descriptor& scale = g.scalar(kScale);
  const Descriptor& ds = g.virtual_tensor(F, l.score_dims());
  g.pointwise(CUDNN_POINTWISE_MUL, weighted, &scale, ds);
  const Descriptor& dst = g.virtual_strided(B, t_dims, t_strides);
  g.reshape(ds, dst);
  grad_kv(dst, q, kDK);
  // dQ = dS K, accumulated in fp32 (K read through a reshape of K^T back to [s, hd]), then bf16.
  const Descriptor& k = g.virtual_strided(F, l.kv_dims(), l.kv_strides());
  g.reshape(kt, k);
  const Descriptor& dq_accum = g.tensor(kDQAccum, F, l.q_dims(), packed_strides(l.q_dims()));
  g.matmul(ds, k, dq_accum);
  const Descriptor& dq = g.tensor(kDQ, B, l.q_dims(), l.q_strides());
  g.pointwise(CUDNN_POINTWISE_IDENTITY, dq_accum, nullptr, dq);
  return g;
}

void check_shape(i64 batch, i64 seq, i64 n_head, i64 head_dim, i64 n_kv_head) {
  const std::string who = "CudnnAttention";
  check(batch > 0 && seq > 0 && n_head > 0 && head_dim > 0,
        who + ": batch, seq, n_head and head_dim must be positive");
  check(n_kv_head > 0 && n_head % n_kv_head == 0, who + ": n_kv_head must divide n_head, got " +
                                                      std::to_string(n_kv_head) + " and " +
                                                      std::to_string(n_head));
  // cuDNN's fused attention: head_dim a multiple of 8 (16-byte rows), at most 128 for the
  // backward on Ampere (256 on Hopper; one rule for both).
  check(head_dim % 8 == 0 && head_dim <= 128,
        who +
            ": head_dim must be a multiple of 8 and at most 128 for cuDNN's fused attention, got " +
            std::to_string(head_dim) + " (use --attention flash)");
}

}  // namespace

void cudnn_attention_validate_graphs(i64 batch, i64 seq, i64 n_head, i64 head_dim, i64 n_kv_head) {
  if (n_kv_head == 0) n_kv_head = n_head;
  check_shape(batch, seq, n_head, head_dim, n_kv_head);
  const Layout layout{batch, seq, n_head, head_dim, n_kv_head};
  for (const bool forward : {true, false}) {
    try {
      Plan::operation_graph(nullptr, forward ? forward_graph(layout) : backward_graph(layout));
    } catch (const Error& e) {
      throw Error(std::string("the fused attention's ") + (forward ? "forward" : "backward") +
                  " graph: " + e.what());
    }
  }
}

struct CudnnAttention::Impl {
  Layout layout{};
  cudnnHandle_t handle = nullptr;
  cudaStream_t stream = nullptr;
  std::unique_ptr<Plan> forward, backward;
  float scale = 1.0f;
  float mask_fill = -std::numeric_limits<float>::infinity();  // a masked score: exp() is 0
  float one = 1.0f;

  ~Impl() {
    forward.reset();
    backward.reset();
    if (handle != nullptr) cudnnDestroy(handle);
  }
};

CudnnAttention::CudnnAttention(Context& ctx, i64 batch, i64 seq, i64 n_head, i64 head_dim,
                               i64 n_kv_head)
    : impl_(std::make_unique<Impl>()) {
  if (n_kv_head == 0) n_kv_head = n_head;
  check_shape(batch, seq, n_head, head_dim, n_kv_head);
  Impl& m = *impl_;
  m.layout = {batch, seq, n_head, head_dim, n_kv_head};
  m.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  PION_CUDNN_CHECK(cudnnCreate(&m.handle));
  m.stream = ctx.impl().stream;
  PION_CUDNN_CHECK(cudnnSetStream(m.handle, m.stream));
  m.forward = std::make_unique<Plan>(m.handle, forward_graph(m.layout), "forward");
  m.backward = std::make_unique<Plan>(m.handle, backward_graph(m.layout), "backward");
}

CudnnAttention::~CudnnAttention() = default;

std::size_t CudnnAttention::workspace_bytes() const {
  return std::max(aligned(impl_->forward->workspace),
                  backward_extra_bytes(impl_->layout) + impl_->backward->workspace);
}

std::string CudnnAttention::description() const {
  return "cuDNN " + std::to_string(cudnnGetVersion()) + ": forward " + impl_->forward->engine +
         ", backward " + impl_->backward->engine;
}

void CudnnAttention::forward(void* out_bf16, float* stats, const void* qkv_bf16, void* workspace) {
  check(out_bf16 != nullptr && stats != nullptr && qkv_bf16 != nullptr,
        "CudnnAttention::forward: null tensor");
  Impl& m = *impl_;
  auto* qkv = static_cast<std::uint16_t*>(const_cast<void*>(qkv_bf16));
  m.forward->execute(m.handle, {kQ, kK, kV, kO, kStats, kScale, kMaskFill},
                     {qkv, qkv + m.layout.k_offset(), qkv + m.layout.v_offset(), out_bf16, stats,
                      &m.scale, &m.mask_fill},
                     workspace);
}

void CudnnAttention::backward(void* dqkv_bf16, const void* dout_bf16, const void* out_bf16,
                              const float* stats, const void* qkv_bf16, void* workspace) {
  check(dqkv_bf16 != nullptr && dout_bf16 != nullptr && out_bf16 != nullptr && stats != nullptr &&
            qkv_bf16 != nullptr && workspace != nullptr,
        "CudnnAttention::backward: null tensor");
  Impl& m = *impl_;
  const Layout& l = m.layout;
  auto* qkv = static_cast<std::uint16_t*>(const_cast<void*>(qkv_bf16));
  auto* dqkv = static_cast<std::uint16_t*>(dqkv_bf16);
  auto* base = static_cast<char*>(workspace);
  // cuDNN before 9.6 expects the dQ accumulator zeroed (later versions zero it themselves).
  if (cudnnGetVersion() < 90600)
    PION_CUDA_CHECK(cudaMemsetAsync(base, 0, dq_accum_bytes(l), m.stream));
  m.backward->execute(
      m.handle,
      {kQ, kK, kV, kO, kDO, kStats, kScale, kMaskFill, kOne, kSoftmaxSum, kDQAccum, kDQ, kDK, kDV},
      {qkv, qkv + l.k_offset(), qkv + l.v_offset(), const_cast<void*>(out_bf16),
       const_cast<void*>(dout_bf16), const_cast<float*>(stats), &m.scale, &m.mask_fill, &m.one,
       base + dq_accum_bytes(l), base, dqkv, dqkv + l.k_offset(), dqkv + l.v_offset()},
      base + backward_extra_bytes(l));
}

}  // namespace pion::cuda::layers

#else  // no cuDNN in this build

#include "pion/core/error.h"

namespace pion::cuda::layers {

std::string cudnn_attention_unavailable() {
  return "built without cuDNN (CMake found no cudnn_graph.h and libcudnn; set PION_CUDNN_ROOT)";
}

struct CudnnAttention::Impl {};

void cudnn_attention_validate_graphs(std::int64_t, std::int64_t, std::int64_t, std::int64_t,
                                     std::int64_t) {
  throw Error("--attention cudnn: this pion was " + cudnn_attention_unavailable());
}

CudnnAttention::CudnnAttention(Context&, i64, i64, i64, i64, i64) {
  throw Error("--attention cudnn: this pion was " + cudnn_attention_unavailable());
}
CudnnAttention::~CudnnAttention() = default;
std::size_t CudnnAttention::workspace_bytes() const {
  return 0;
}
std::string CudnnAttention::description() const {
  return {};
}
void CudnnAttention::forward(void*, float*, const void*, void*) {}
void CudnnAttention::backward(void*, const void*, const void*, const float*, const void*, void*) {}

}  // namespace pion::cuda::layers

#endif
