// One side of a Gibbs sweep of Bayesian biased matrix factorisation.
//
// For every row e of one side (users, or items) the op draws the row from its
// Gaussian conditional posterior given the other side's table, the prior
// precisions and the noise precisions.  With z = [q_j, 1] the other row's
// factors and a constant for the bias, and y = r - mu - b_j the rating less
// the global mean and the other row's bias, over the ratings of row e:
//
//   precision  P = diag(prior_precision) + noise_precision[e] * sum w_j z z^T
//   mean       m = P^-1 * noise_precision[e] * sum w_j z y
//   sample     x = m + L^-T eps,  P = L L^T,  eps ~ N(0, I) (given as `noise`)
//
// A rating's noise precision is the product noise_precision[e] * w_j of a
// factor of its row's and one of the other row's (w = `other_weight`): tau
// and ones for one noise level for every rating, per-user and per-movie
// factors for the heteroscedastic noise of trainer/rating/posterior.py.
//
// The rows are independent given the other side, so they are split over
// `threads` threads in chunks of about kChunkRatings ratings (a frequent
// movie can have thousands; the vocabulary puts them first); each row's
// arithmetic is the same whatever the thread count, so the outputs are
// bit-identical for any `threads`.  Rows are compiled for the usual widths
// (8, 16 or 32 factors, plus the bias) so the sums unroll and vectorise, and
// for AVX2 where the CPU has it (below).  The other side's rows are gathered in
// rating order and prefetched kPrefetchRatings ahead.  Sums are in double
// precision.  `squared_error` is, for each row, the sum over its ratings of
// w_j (y - z . x)^2 for the drawn row, the residual the noise precisions'
// updates need, from the same sums: sum w y^2 - 2 x . sum w z y +
// x^T (sum w z z^T) x.
//
// The ratings come grouped by row: those of row e are positions
// offsets[e] .. offsets[e + 1] - 1 of `other` (the other side's row) and
// `target` (r - mu).  trainer/rating/posterior.py drives the sweeps and holds the
// same computation in numpy, for machines without a compiler.
//
// Built by trainer/ops/kernels.py with the other ops.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "grouped_rows.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace movielens {
namespace {

namespace tf = ::tensorflow;

REGISTER_OP("MatrixFactorizationSampleRows")
    .Input("offsets: int64")
    .Input("other: int32")
    .Input("target: float")
    .Input("other_table: float")
    .Input("prior_precision: float")
    .Input("noise_precision: float")
    .Input("other_weight: float")
    .Input("noise: float")
    .Input("threads: int32")
    .Output("sample: float")
    .Output("mean: float")
    .Output("squared_error: double")
    .SetShapeFn([](tf::shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(7));
      c->set_output(1, c->input(7));
      c->set_output(2, c->Vector(c->Dim(c->input(7), 0)));
      return absl::OkStatus();
    })
    .Doc(R"doc(
Draws every row of one side of a biased matrix factorisation from its
conditional posterior; also returns the conditional means and each drawn
row's weighted squared residual.
)doc");

// On x86-64, Rows is compiled twice, for AVX2 and for the baseline, and the
// loader picks the one this CPU runs: the image that builds the library may
// run on another machine type, so no -march=native.  The sums are
// elementwise, so both give the same bits (-ffp-contract=off: no FMA).
#if defined(__x86_64__) && defined(__GNUC__)
#define MOVIELENS_AVX2_CLONE __attribute__((target_clones("avx2", "default")))
#else
#define MOVIELENS_AVX2_CLONE
#endif

// A thread takes whole rows, about this many ratings at a time.
constexpr int64_t kChunkRatings = 8192;
// How far ahead of the current rating the other side's row is prefetched.
constexpr int64_t kPrefetchRatings = 8;

class SampleRowsOp : public tf::OpKernel {
 public:
  explicit SampleRowsOp(tf::OpKernelConstruction* ctx) : tf::OpKernel(ctx) {}

  void Compute(tf::OpKernelContext* ctx) override {
    const tf::Tensor& offsets = ctx->input(0);
    const tf::Tensor& other = ctx->input(1);
    const tf::Tensor& target = ctx->input(2);
    const tf::Tensor& other_table = ctx->input(3);
    const tf::Tensor& prior = ctx->input(4);
    const tf::Tensor& noise_precision = ctx->input(5);
    const tf::Tensor& other_weight = ctx->input(6);
    const tf::Tensor& noise = ctx->input(7);
    OP_REQUIRES(ctx, offsets.dims() == 1 && offsets.NumElements() >= 1,
                absl::InvalidArgumentError("offsets must be a vector of rows + 1"));
    OP_REQUIRES(ctx, other.dims() == 1 && target.dims() == 1 &&
                         other.NumElements() == target.NumElements(),
                absl::InvalidArgumentError("other and target must be vectors of one length"));
    OP_REQUIRES(ctx, other_table.dims() == 2 && noise.dims() == 2,
                absl::InvalidArgumentError("other_table and noise must be matrices"));
    const int64_t rows = offsets.NumElements() - 1;
    const int64_t width = other_table.dim_size(1);
    const int64_t ratings = other.NumElements();
    OP_REQUIRES(ctx, width >= 1 && noise.dim_size(0) == rows && noise.dim_size(1) == width,
                absl::InvalidArgumentError(
                    "noise must be [rows, width] and other_table [other rows, width]"));
    OP_REQUIRES(ctx, prior.dims() == 1 && prior.NumElements() == width,
                absl::InvalidArgumentError("prior_precision must have one entry per column"));
    OP_REQUIRES(ctx, noise_precision.dims() == 1 && noise_precision.NumElements() == rows,
                absl::InvalidArgumentError("noise_precision must have one entry per row"));
    OP_REQUIRES(ctx, other_weight.dims() == 1 &&
                         other_weight.NumElements() == other_table.dim_size(0),
                absl::InvalidArgumentError("other_weight must have one entry per other row"));
    OP_REQUIRES_OK(ctx, CheckGroupedRows(offsets, other, other_table.dim_size(0)));
    const auto offset = offsets.flat<int64_t>();
    const auto other_index = other.flat<int32_t>();
    const auto precision = prior.flat<float>();
    for (int64_t d = 0; d < width; ++d) {
      OP_REQUIRES(ctx, precision(d) > 0.0f,
                  absl::InvalidArgumentError("prior_precision must be positive"));
    }
    const auto tau = noise_precision.flat<float>();
    for (int64_t e = 0; e < rows; ++e) {
      OP_REQUIRES(ctx, tau(e) > 0.0f,
                  absl::InvalidArgumentError("noise_precision must be positive"));
    }
    const auto weight = other_weight.flat<float>();
    for (int64_t j = 0; j < weight.size(); ++j) {
      OP_REQUIRES(ctx, weight(j) > 0.0f,
                  absl::InvalidArgumentError("other_weight must be positive"));
    }

    tf::Tensor* sample = nullptr;
    tf::Tensor* mean = nullptr;
    tf::Tensor* squared = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, noise.shape(), &sample));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, noise.shape(), &mean));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, tf::TensorShape({rows}), &squared));

    Sweep sweep{offset.data(), other_index.data(), target.flat<float>().data(),
                other_table.flat<float>().data(), precision.data(), tau.data(),
                weight.data(), noise.flat<float>().data(), width,
                sample->flat<float>().data(), mean->flat<float>().data(),
                squared->flat<double>().data()};
    const int threads = ctx->input(8).scalar<int32_t>()();
    RunChunks(ChunkRows(offset.data(), rows, kChunkRatings), threads, [&sweep] {
      return [&sweep, scratch = std::vector<double>()](int64_t first, int64_t last) mutable {
        switch (sweep.width) {  // the widths of 8, 16 and 32 factors, unrolled
          case 9: sweep.Rows<9>(first, last, &scratch); break;
          case 17: sweep.Rows<17>(first, last, &scratch); break;
          case 33: sweep.Rows<33>(first, last, &scratch); break;
          default: sweep.Rows<0>(first, last, &scratch);
        }
      };
    });
  }

 private:
  struct Sweep {
    const int64_t* offsets;
    const int32_t* other;
    const float* target;
    const float* other_table;
    const float* prior;
    const float* tau;
    const float* weight;
    const float* noise;
    int64_t width;
    float* sample;
    float* mean;
    double* row_squared_error;

    template <int64_t kWidth>
    MOVIELENS_AVX2_CLONE void Rows(int64_t first, int64_t last, std::vector<double>* scratch) {
      for (int64_t e = first; e < last; ++e) Row<kWidth>(e, scratch);
    }

    // Draws row e.  kWidth: the width known at compile time, or 0 (width).
    // scratch: the sums (sum z z^T, lower triangle, and sum z y), the
    // precision and then its Cholesky factor, the mean, z, x.
    template <int64_t kWidth>
    __attribute__((always_inline)) inline void Row(int64_t e, std::vector<double>* scratch) {
      const int64_t w = kWidth > 0 ? kWidth : width;
      scratch->assign(2 * w * w + 4 * w, 0.0);
      double* gram = scratch->data();
      double* zy = gram + w * w;
      double* p = zy + w;
      double* rhs = p + w * w;
      double* z = rhs + w;
      double* x = z + w;
      double yy = 0.0;
      const int64_t end = offsets[e + 1];
      for (int64_t n = offsets[e]; n < end; ++n) {
        if (n + kPrefetchRatings < end) {
          const char* ahead = reinterpret_cast<const char*>(
              other_table + static_cast<int64_t>(other[n + kPrefetchRatings]) * w);
          __builtin_prefetch(ahead);
          __builtin_prefetch(ahead + 64);
        }
        const float* row = other_table + static_cast<int64_t>(other[n]) * w;
        for (int64_t d = 0; d + 1 < w; ++d) z[d] = row[d];
        z[w - 1] = 1.0;
        const double y = static_cast<double>(target[n]) - row[w - 1];
        const double weight_n = weight[other[n]];
        yy += weight_n * y * y;
        for (int64_t i = 0; i < w; ++i) {
          const double zi = weight_n * z[i];
          zy[i] += zi * y;
          double* gram_row = gram + i * w;
          for (int64_t j = 0; j <= i; ++j) gram_row[j] += zi * z[j];
        }
      }
      for (int64_t i = 0; i < w; ++i) {
        rhs[i] = zy[i];
        for (int64_t j = 0; j <= i; ++j) p[i * w + j] = gram[i * w + j];
      }
      const double tau_e = tau[e];
      for (int64_t i = 0; i < w; ++i) {
        for (int64_t j = 0; j <= i; ++j) p[i * w + j] *= tau_e;
        p[i * w + i] += prior[i];
        rhs[i] *= tau_e;
      }
      // Cholesky, lower triangle in place: P = L L^T.  P is the sum of a
      // positive diagonal and a Gram matrix, so every pivot is positive.
      for (int64_t j = 0; j < w; ++j) {
        double diagonal = p[j * w + j];
        for (int64_t k = 0; k < j; ++k) diagonal -= p[j * w + k] * p[j * w + k];
        diagonal = std::sqrt(diagonal);
        p[j * w + j] = diagonal;
        for (int64_t i = j + 1; i < w; ++i) {
          double value = p[i * w + j];
          for (int64_t k = 0; k < j; ++k) value -= p[i * w + k] * p[j * w + k];
          p[i * w + j] = value / diagonal;
        }
      }
      // mean = L^-T L^-1 rhs, then x = mean + L^-T eps.
      for (int64_t i = 0; i < w; ++i) {
        double value = rhs[i];
        for (int64_t k = 0; k < i; ++k) value -= p[i * w + k] * rhs[k];
        rhs[i] = value / p[i * w + i];
      }
      const float* eps = noise + e * w;
      for (int64_t i = w - 1; i >= 0; --i) {
        double m = rhs[i];
        double s = eps[i];
        for (int64_t k = i + 1; k < w; ++k) {
          m -= p[k * w + i] * rhs[k];
          s -= p[k * w + i] * x[k];
        }
        rhs[i] = m / p[i * w + i];
        x[i] = s / p[i * w + i];
      }
      float* sample_row = sample + e * w;
      float* mean_row = mean + e * w;
      for (int64_t i = 0; i < w; ++i) {
        mean_row[i] = static_cast<float>(rhs[i]);
        sample_row[i] = static_cast<float>(rhs[i] + x[i]);
      }
      // sum (y - z.x)^2 = sum y^2 - 2 x . sum z y + x^T (sum z z^T) x, x as stored.
      double cross = 0.0;
      double quadratic = 0.0;
      for (int64_t i = 0; i < w; ++i) {
        const double xi = sample_row[i];
        cross += xi * zy[i];
        quadratic += xi * xi * gram[i * w + i];
        for (int64_t j = 0; j < i; ++j) quadratic += 2.0 * xi * sample_row[j] * gram[i * w + j];
      }
      row_squared_error[e] = std::max(0.0, yy - 2.0 * cross + quadratic);
    }
  };
};

REGISTER_KERNEL_BUILDER(Name("MatrixFactorizationSampleRows").Device(tf::DEVICE_CPU),
                        SampleRowsOp);

}  // namespace
}  // namespace movielens
