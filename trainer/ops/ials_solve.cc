// One half-step of implicit-feedback ALS: every row of one side re-solved by
// conjugate gradient, the other side fixed.
//
// trainer/topn/ials.py states the model; for row e with rated pairs n (the other
// side's row y_n, weight c_n, target t_n) the new row x solves
//
//   A x = b,   A = gram + l2[e] I + sum_n c_n y_n y_n^T,   b = sum_n c_n t_n y_n
//
// where gram = alpha0 Y^T Y is the same for every row (computed by the
// caller).  Starting from the row's current value (`start`), `cg_steps`
// conjugate-gradient steps each cost one pass over the row's pairs and one
// k x k product: the computation of `ials.half_step` (TensorFlow ops, float32),
// row by row in float32 with double-precision step sizes, so the two agree to rounding (a step
// whose curvature p.Ap is 0 moves nothing, like tf.math.divide_no_nan).  Rows are independent, so they are split over
// `threads` threads in chunks of about kChunkPairs pairs; each row's
// arithmetic is the same whatever the thread count, so the output is
// bit-identical for any `threads`.
//
// The pairs come grouped by row: those of row e are positions
// offsets[e] .. offsets[e + 1] - 1 of `other`, `weight` and `target`.  A row
// without pairs solves to 0 at once (its exact optimum: b = 0), so rows the
// data leaves empty (a sample of the users, OOV rows) cost nothing.
//
// With `with_loss`, the op also returns each row's rated loss at its new
// value, sum_n c_n (t_n - y_n . x)^2 (the dot in float32 as the scores are,
// the sum in double), from the y_n it has already gathered: one more pass
// over the row's pairs, where a separate pass over all pairs would gather
// both factor rows of every pair again.  After both half-steps of an
// iteration, the second's losses sum to the rated part of the objective
// (`ials.py`); without `with_loss` the output is empty.
//
// Built by trainer/ops/kernels.py with the other ops.

#include <cstdint>
#include <vector>

#include "grouped_rows.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace movielens {
namespace {

namespace tf = ::tensorflow;

REGISTER_OP("ImplicitAlsSolveRows")
    .Input("offsets: int64")
    .Input("other: int32")
    .Input("weight: float")
    .Input("target: float")
    .Input("other_table: float")
    .Input("gram: float")
    .Input("l2: float")
    .Input("start: float")
    .Input("cg_steps: int32")
    .Input("threads: int32")
    .Input("with_loss: bool")
    .Output("solved: float")
    .Output("rated_loss: double")
    .SetShapeFn([](tf::shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(7));
      c->set_output(1, c->Vector(c->UnknownDim()));
      return absl::OkStatus();
    })
    .Doc(R"doc(
Re-solves every row of one side of an implicit-feedback ALS model by a few
conjugate-gradient steps from its current value; with with_loss, also each
row's rated loss sum c (t - y.x)^2 at its new value (else an empty vector).
)doc");

#if defined(__x86_64__) && defined(__GNUC__)
#define MOVIELENS_AVX2_CLONE __attribute__((target_clones("avx2", "default")))
#else
#define MOVIELENS_AVX2_CLONE
#endif

// A thread takes whole rows, about this many pairs (and at most kChunkRows rows) at a time.
constexpr int64_t kChunkPairs = 16384;
constexpr int64_t kChunkRows = 4096;
// How far ahead of the current pair the other side's row is prefetched.
constexpr int64_t kPrefetchPairs = 8;

struct Solve {
  const int64_t* offsets;
  const int32_t* other;
  const float* weight;
  const float* target;
  const float* other_table;
  const float* gram;
  const float* l2;
  const float* start;
  int64_t width;
  int cg_steps;
  float* solved;
  double* loss;  // per row, or null

  // out = (gram + l2 I + sum_n c_n y_n y_n^T) v for row e; ys holds the
  // row's y_n one after another (gathered once per row, read once per pass).
  template <int64_t kWidth>
  __attribute__((always_inline)) inline void Apply(int64_t e, const float* ys,
                                                   const float* v, float* out) const {
    const int64_t w = kWidth > 0 ? kWidth : width;
    for (int64_t i = 0; i < w; ++i) {
      float value = l2[e] * v[i];
      const float* gram_row = gram + i * w;
      for (int64_t j = 0; j < w; ++j) value += gram_row[j] * v[j];
      out[i] = value;
    }
    const int64_t count = offsets[e + 1] - offsets[e];
    const float* c = weight + offsets[e];
    for (int64_t n = 0; n < count; ++n) {
      const float* y = ys + n * w;
      float dot = 0.0f;
      for (int64_t i = 0; i < w; ++i) dot += y[i] * v[i];
      dot *= c[n];
      for (int64_t i = 0; i < w; ++i) out[i] += dot * y[i];
    }
  }

  template <int64_t kWidth>
  MOVIELENS_AVX2_CLONE void Rows(int64_t first, int64_t last, std::vector<float>* scratch,
                                 std::vector<float>* gathered) const {
    for (int64_t e = first; e < last; ++e) Row<kWidth>(e, scratch, gathered);
  }

  // scratch: x, r, p, Ap; gathered: the row's y_n.
  template <int64_t kWidth>
  __attribute__((always_inline)) inline void Row(int64_t e, std::vector<float>* scratch,
                                                 std::vector<float>* gathered) const {
    const int64_t w = kWidth > 0 ? kWidth : width;
    const int64_t first = offsets[e];
    const int64_t count = offsets[e + 1] - first;
    if (count == 0) {  // b = 0 and A is positive definite: the row's optimum is 0
      for (int64_t i = 0; i < w; ++i) solved[e * w + i] = 0.0f;
      if (loss != nullptr) loss[e] = 0.0;
      return;
    }
    scratch->assign(4 * w, 0.0f);
    float* x = scratch->data();
    float* r = x + w;
    float* p = r + w;
    float* ap = p + w;
    for (int64_t i = 0; i < w; ++i) x[i] = start[e * w + i];
    if (static_cast<int64_t>(gathered->size()) < count * w) gathered->resize(count * w);
    float* ys = gathered->data();
    for (int64_t n = 0; n < count; ++n) {  // gather the y_n; r = b
      if (n + kPrefetchPairs < count) {
        const char* ahead = reinterpret_cast<const char*>(
            other_table + static_cast<int64_t>(other[first + n + kPrefetchPairs]) * w);
        for (int64_t byte = 0; byte < w * 4; byte += 64) __builtin_prefetch(ahead + byte);
      }
      const float* y = other_table + static_cast<int64_t>(other[first + n]) * w;
      float* copy = ys + n * w;
      const float scale = weight[first + n] * target[first + n];
      for (int64_t i = 0; i < w; ++i) {
        copy[i] = y[i];
        r[i] += scale * y[i];
      }
    }
    Apply<kWidth>(e, ys, x, ap);
    double norm = 0.0;
    for (int64_t i = 0; i < w; ++i) {
      r[i] -= ap[i];
      p[i] = r[i];
      norm += r[i] * r[i];
    }
    for (int step = 0; step < cg_steps; ++step) {
      Apply<kWidth>(e, ys, p, ap);
      double curvature = 0.0;
      for (int64_t i = 0; i < w; ++i) curvature += p[i] * ap[i];
      const float alpha = curvature != 0.0 ? static_cast<float>(norm / curvature) : 0.0f;
      double new_norm = 0.0;
      for (int64_t i = 0; i < w; ++i) {
        x[i] += alpha * p[i];
        r[i] -= alpha * ap[i];
        new_norm += r[i] * r[i];
      }
      const float beta = norm != 0.0 ? static_cast<float>(new_norm / norm) : 0.0f;
      for (int64_t i = 0; i < w; ++i) p[i] = r[i] + beta * p[i];
      norm = new_norm;
    }
    float* row = solved + e * w;
    for (int64_t i = 0; i < w; ++i) row[i] = x[i];
    if (loss != nullptr) {
      const float* c = weight + first;
      const float* t = target + first;
      double total = 0.0;
      for (int64_t n = 0; n < count; ++n) {
        const float* y = ys + n * w;
        float dot = 0.0f;
        for (int64_t i = 0; i < w; ++i) dot += y[i] * x[i];
        const double error = static_cast<double>(t[n]) - static_cast<double>(dot);
        total += static_cast<double>(c[n]) * error * error;
      }
      loss[e] = total;
    }
  }
};

class SolveRowsOp : public tf::OpKernel {
 public:
  explicit SolveRowsOp(tf::OpKernelConstruction* ctx) : tf::OpKernel(ctx) {}

  void Compute(tf::OpKernelContext* ctx) override {
    const tf::Tensor& offsets = ctx->input(0);
    const tf::Tensor& other = ctx->input(1);
    const tf::Tensor& weight = ctx->input(2);
    const tf::Tensor& target = ctx->input(3);
    const tf::Tensor& other_table = ctx->input(4);
    const tf::Tensor& gram = ctx->input(5);
    const tf::Tensor& l2 = ctx->input(6);
    const tf::Tensor& start = ctx->input(7);
    OP_REQUIRES(ctx, offsets.dims() == 1 && offsets.NumElements() >= 1,
                absl::InvalidArgumentError("offsets must be a vector of rows + 1"));
    const int64_t rows = offsets.NumElements() - 1;
    const int64_t pairs = other.NumElements();
    OP_REQUIRES(ctx, other.dims() == 1 && weight.dims() == 1 && target.dims() == 1 &&
                         weight.NumElements() == pairs && target.NumElements() == pairs,
                absl::InvalidArgumentError("other, weight and target must be vectors of one length"));
    OP_REQUIRES(ctx, other_table.dims() == 2 && start.dims() == 2 &&
                         start.dim_size(0) == rows && start.dim_size(1) == other_table.dim_size(1),
                absl::InvalidArgumentError("start must be [rows, k] and other_table [other rows, k]"));
    const int64_t width = start.dim_size(1);
    OP_REQUIRES(ctx, gram.dims() == 2 && gram.dim_size(0) == width && gram.dim_size(1) == width,
                absl::InvalidArgumentError("gram must be [k, k]"));
    OP_REQUIRES(ctx, l2.dims() == 1 && l2.NumElements() == rows,
                absl::InvalidArgumentError("l2 must have one entry per row"));
    OP_REQUIRES_OK(ctx, CheckGroupedRows(offsets, other, other_table.dim_size(0)));
    const auto offset = offsets.flat<int64_t>();
    const auto other_index = other.flat<int32_t>();
    const int cg_steps = ctx->input(8).scalar<int32_t>()();
    OP_REQUIRES(ctx, cg_steps >= 0, absl::InvalidArgumentError("cg_steps must be >= 0"));

    tf::Tensor* solved = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, start.shape(), &solved));
    const bool with_loss = ctx->input(10).scalar<bool>()();
    tf::Tensor* loss = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, tf::TensorShape({with_loss ? rows : 0}), &loss));
    const Solve solve{offset.data(), other_index.data(), weight.flat<float>().data(),
                      target.flat<float>().data(), other_table.flat<float>().data(),
                      gram.flat<float>().data(), l2.flat<float>().data(),
                      start.flat<float>().data(), width, cg_steps,
                      solved->flat<float>().data(),
                      with_loss ? loss->flat<double>().data() : nullptr};
    const int threads = ctx->input(9).scalar<int32_t>()();
    RunChunks(ChunkRows(offset.data(), rows, kChunkPairs, kChunkRows), threads, [&solve] {
      return [&solve, scratch = std::vector<float>(), gathered = std::vector<float>()](
                 int64_t first, int64_t last) mutable {
        switch (solve.width) {  // the usual widths, unrolled
          case 16: solve.Rows<16>(first, last, &scratch, &gathered); break;
          case 32: solve.Rows<32>(first, last, &scratch, &gathered); break;
          case 64: solve.Rows<64>(first, last, &scratch, &gathered); break;
          case 128: solve.Rows<128>(first, last, &scratch, &gathered); break;
          default: solve.Rows<0>(first, last, &scratch, &gathered);
        }
      };
    });
  }
};

REGISTER_KERNEL_BUILDER(Name("ImplicitAlsSolveRows").Device(tf::DEVICE_CPU), SolveRowsOp);

}  // namespace
}  // namespace movielens
