// The squared and absolute errors of a biased matrix factorisation's clipped
// predictions over rating columns, as one op: what the trainer scores the
// validation slice and the eval split with after every epoch.
//
// The TensorFlow form (trainer/rating/train.py's make_scorer) gathers both
// tables' rows of every rating into [n, factors + 1] copies before it
// multiplies them; this op reads each rating's two rows in place, fetched
// 8 ratings ahead (the tables do not fit the caches at 25M ratings), on
// `threads` threads.  The ratings are cut into fixed chunks whose float64
// sums are added in chunk order, so the result is the same on any thread
// count.  The prediction is computed as trainer/ops/fused_epoch.cc's:
// mu + b_u + b_i + p_u . q_i, the dot product summed in column order.
//
// Built by trainer/ops/kernels.py with the compiler flags TensorFlow reports.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace movielens {
namespace {

namespace tf = ::tensorflow;

REGISTER_OP("MatrixFactorizationScore")
    .Input("user_table: float")
    .Input("item_table: float")
    .Input("user: int32")
    .Input("item: int32")
    .Input("rating: float")
    .Input("global_mean: float")
    .Input("rating_range: float")
    .Input("threads: int32")
    .Output("sums: double")
    .SetShapeFn([](tf::shape_inference::InferenceContext* c) {
      c->set_output(0, c->Vector(2));
      return absl::OkStatus();
    })
    .Doc(R"doc(
Sums the errors of clipped predictions of a biased matrix factorisation.

user_table, item_table: [rows, factors + 1], each row its factors then its bias.
rating_range: [min, max], what predictions are clipped to.
sums: [squared error, absolute error] summed over the ratings.
)doc");

// Ratings per chunk: each chunk's sums are one unit of work and of addition order.
constexpr int64_t kChunk = 16384;
constexpr int64_t kPrefetchRows = 8;

class MatrixFactorizationScoreOp : public tf::OpKernel {
 public:
  explicit MatrixFactorizationScoreOp(tf::OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(tf::OpKernelContext* ctx) override {
    const tf::Tensor& user_table = ctx->input(0);
    const tf::Tensor& item_table = ctx->input(1);
    OP_REQUIRES(ctx, user_table.dims() == 2 && item_table.dims() == 2 &&
                         user_table.dim_size(1) == item_table.dim_size(1) &&
                         user_table.dim_size(1) >= 1,
                tf::errors::InvalidArgument(
                    "the tables must be [rows, factors + 1] with one column count, got ",
                    user_table.shape().DebugString(), " and ",
                    item_table.shape().DebugString()));
    const tf::Tensor& user = ctx->input(2);
    const tf::Tensor& item = ctx->input(3);
    const tf::Tensor& rating = ctx->input(4);
    const int64_t n = rating.NumElements();
    OP_REQUIRES(ctx, user.NumElements() == n && item.NumElements() == n,
                tf::errors::InvalidArgument("user, item and rating must have one length"));
    const tf::Tensor& range = ctx->input(6);
    OP_REQUIRES(ctx, range.NumElements() == 2,
                tf::errors::InvalidArgument("rating_range must be [min, max]"));
    const int64_t user_rows = user_table.dim_size(0), item_rows = item_table.dim_size(0);
    const int32_t* users = user.flat<int32_t>().data();
    const int32_t* items = item.flat<int32_t>().data();
    for (int64_t i = 0; i < n; ++i) {
      OP_REQUIRES(ctx, users[i] >= 0 && users[i] < user_rows,
                  tf::errors::InvalidArgument("user index ", users[i], " at ", i,
                                              " is not in [0, ", user_rows, ")"));
      OP_REQUIRES(ctx, items[i] >= 0 && items[i] < item_rows,
                  tf::errors::InvalidArgument("item index ", items[i], " at ", i,
                                              " is not in [0, ", item_rows, ")"));
    }
    Scoring scoring{user_table.flat<float>().data(),
                    item_table.flat<float>().data(),
                    users, items, rating.flat<float>().data(),
                    user_table.dim_size(1), ctx->input(5).scalar<float>()(),
                    range.flat<float>()(0), range.flat<float>()(1)};
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    std::vector<double> sums(2 * chunks, 0.0);
    const int threads = static_cast<int>(std::max<int64_t>(
        1, std::min<int64_t>({ctx->input(7).scalar<int32_t>()(), 64, chunks})));
    std::atomic<int64_t> next{0};
    auto work = [&] {
      for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) {
        scoring.Chunk(c * kChunk, std::min(n, (c + 1) * kChunk), &sums[2 * c]);
      }
    };
    std::vector<std::thread> helpers;
    for (int t = 1; t < threads; ++t) helpers.emplace_back(work);
    work();
    for (auto& helper : helpers) helper.join();
    tf::Tensor* out;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, tf::TensorShape({2}), &out));
    double squared = 0.0, absolute = 0.0;
    for (int64_t c = 0; c < chunks; ++c) {  // in chunk order: the same sums every run
      squared += sums[2 * c];
      absolute += sums[2 * c + 1];
    }
    out->flat<double>()(0) = squared;
    out->flat<double>()(1) = absolute;
  }

 private:
  struct Scoring {
    const float* user_table;
    const float* item_table;
    const int32_t* user;
    const int32_t* item;
    const float* rating;
    int64_t columns;
    float mu, rating_min, rating_max;

    // Adds the squared and absolute errors of ratings [low, high) to out[0], out[1].
    void Chunk(int64_t low, int64_t high, double* out) const {
      const int64_t k = columns - 1;
      double squared = 0.0, absolute = 0.0;
      for (int64_t r = low; r < high; ++r) {
        if (r + kPrefetchRows < high) {
          const float* ahead_user = user_table + user[r + kPrefetchRows] * columns;
          const float* ahead_item = item_table + item[r + kPrefetchRows] * columns;
          __builtin_prefetch(ahead_user);
          __builtin_prefetch(ahead_user + k);
          __builtin_prefetch(ahead_item);
          __builtin_prefetch(ahead_item + k);
        }
        const float* p = user_table + static_cast<int64_t>(user[r]) * columns;
        const float* q = item_table + static_cast<int64_t>(item[r]) * columns;
        float dot = 0.0f;
        for (int64_t c = 0; c < k; ++c) dot += p[c] * q[c];
        const float prediction = mu + p[k] + q[k] + dot;
        const double error = static_cast<double>(
            std::min(std::max(prediction, rating_min), rating_max) - rating[r]);
        squared += error * error;
        absolute += std::abs(error);
      }
      out[0] += squared;
      out[1] += absolute;
    }
  };
};

REGISTER_KERNEL_BUILDER(Name("MatrixFactorizationScore").Device(tf::DEVICE_CPU),
                        MatrixFactorizationScoreOp);

}  // namespace
}  // namespace movielens
