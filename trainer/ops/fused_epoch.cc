// One training epoch of biased matrix factorisation with lazy Adam, as one op.
//
// The TensorFlow form of a step (trainer/rating/train.py) is a chain of about 45
// small kernels; on a CPU their scheduling costs more than their arithmetic.
// This op runs the same computation for a whole epoch: for each batch of the
// ratings, in the order `order` gives (the epoch's permutation), it gathers
// the user and item rows, computes the predictions, the objective and its
// per-example gradient rows (as trainer/rating/model.py's
// loss_and_gradients), scales them by 1 / batch rows, sums
// the rows that share an index in batch order, and applies one lazy Adam step
// (as trainer/rating/optimizers.py's Adam) to each distinct row.  Every gradient of a
// batch is computed before any row of it is updated, as in the TF form.
//
// The work of a batch is split over `threads` threads: each computes the
// gradients of a contiguous part of the batch; one thread per table sums the
// duplicate rows; each updates a contiguous part of every table's distinct
// rows.  Every parameter comes out the same whatever the thread count; only
// the order of the epoch's float64 totals changes.
//
// With an order, the threads first copy the user, item and rating columns
// into that order, each a contiguous part, fetching entries 16 ahead: the
// copies TensorFlow's three gathers made before the op (`data.shuffle`), for
// about a sixth of their CPU time at 18M ratings.  Reading the ratings
// through the order inside the training loop instead made the epoch 60%
// slower than on the copies: three more cache misses per rating where the
// table rows already wait for memory (docs/performance.md#the-fused-epoch).
//
// Built by trainer/ops/kernels.py with the compiler flags TensorFlow reports.

#define EIGEN_USE_THREADS

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/kernels/training_op_helpers.h"

namespace movielens {
namespace {

namespace tf = ::tensorflow;
using CPUDevice = Eigen::ThreadPoolDevice;

REGISTER_OP("MatrixFactorizationAdamEpoch")
    .Input("user_table: resource")
    .Input("item_table: resource")
    .Input("user_m: resource")
    .Input("user_v: resource")
    .Input("item_m: resource")
    .Input("item_v: resource")
    .Input("user: int32")
    .Input("item: int32")
    .Input("rating: float")
    .Input("order: int32")
    .Input("user_weight: float")
    .Input("item_weight: float")
    .Input("penalty: float")
    .Input("global_mean: float")
    .Input("learning_rate: float")
    .Input("first_step: int64")
    .Input("batch_size: int32")
    .Input("rating_range: float")
    .Input("threads: int32")
    .Output("totals: double")
    .Attr("beta_1: float = 0.9")
    .Attr("beta_2: float = 0.999")
    .Attr("epsilon: float = 1e-7")
    .SetShapeFn([](tf::shape_inference::InferenceContext* c) {
      c->set_output(0, c->Vector(4));
      return absl::OkStatus();
    })
    .Doc(R"doc(
Trains one epoch of biased matrix factorisation with lazy Adam, in place.

user, item, rating: the ratings.
order: the positions of the ratings in the order to train them, or empty to
  train them as they come.
user_weight, item_weight: per-row penalty weights, or both empty for 1.
penalty: the L2 strength of each column of a table row.
first_step: the optimiser's step count plus one.
totals: [objective, ratings, squared error, absolute error] summed over the
  epoch; the errors are of clipped predictions made before each update.
)doc");

// All threads wait here until every one has arrived.
class SpinBarrier {
 public:
  explicit SpinBarrier(int parties) : parties_(parties) {}

  void Wait() {
    if (parties_ == 1) return;
    const int generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == parties_) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
      return;
    }
    for (int spins = 0; generation_.load(std::memory_order_acquire) == generation; ++spins) {
      if (spins > 2000) std::this_thread::yield();
    }
  }

 private:
  const int parties_;
  std::atomic<int> arrived_{0};
  std::atomic<int> generation_{0};
};

// Rows this far ahead are fetched into the cache while the current one is
// computed: the tables are too large for the cache at 25M ratings.
constexpr int64_t kPrefetchRows = 8;

inline void Prefetch(const float* row, int64_t columns) {
  __builtin_prefetch(row);
  __builtin_prefetch(row + columns - 1);
}

// One table with its two Adam moments, and the batch's summed gradient rows.
struct Side {
  float* table;
  float* m;
  float* v;
  const int32_t* index;      // the epoch's row index per rating
  const float* weight;       // per-row penalty weights, or nullptr
  std::vector<float> gradient;  // [batch rows, columns]
  std::vector<int32_t> keys, slots, unique;
  std::vector<float> sum;       // [unique rows, columns]

  // Sums the gradient rows of index[start, start + rows) that share an index,
  // in batch order; distinct indices in order of first occurrence.
  void SumDuplicates(int64_t start, int64_t rows, int64_t columns) {
    int64_t capacity = 16;
    while (capacity < 2 * rows) capacity <<= 1;
    keys.assign(capacity, -1);
    slots.resize(capacity);
    unique.clear();
    sum.resize(rows * columns);
    for (int64_t b = 0; b < rows; ++b) {
      const int32_t key = index[start + b];
      uint64_t slot = (static_cast<uint64_t>(static_cast<uint32_t>(key)) *
                       0x9E3779B97F4A7C15ull) >> 32;
      slot &= capacity - 1;
      while (keys[slot] != -1 && keys[slot] != key) slot = (slot + 1) & (capacity - 1);
      const float* row = gradient.data() + b * columns;
      if (keys[slot] == -1) {
        keys[slot] = key;
        slots[slot] = static_cast<int32_t>(unique.size());
        float* out = sum.data() + unique.size() * columns;
        unique.push_back(key);
        for (int64_t c = 0; c < columns; ++c) out[c] = row[c];
      } else {
        float* out = sum.data() + static_cast<int64_t>(slots[slot]) * columns;
        for (int64_t c = 0; c < columns; ++c) out[c] += row[c];
      }
    }
  }

  // One Adam step on the distinct rows [part * n / parts, (part + 1) * n / parts).
  void Update(int part, int parts, int64_t columns, float step_size, float beta_1,
              float one_minus_beta_1, float beta_2, float one_minus_beta_2,
              float epsilon) {
    const int64_t n = static_cast<int64_t>(unique.size());
    const int64_t low = n * part / parts, high = n * (part + 1) / parts;
    for (int64_t u = low; u < high; ++u) {
      if (u + kPrefetchRows < high) {
        const int64_t ahead = static_cast<int64_t>(unique[u + kPrefetchRows]) * columns;
        for (const float* base : {table, m, v}) Prefetch(base + ahead, columns);
      }
      const int64_t offset = static_cast<int64_t>(unique[u]) * columns;
      const float* g = sum.data() + u * columns;
      float* w = table + offset;
      float* mr = m + offset;
      float* vr = v + offset;
      for (int64_t c = 0; c < columns; ++c) {
        const float mc = beta_1 * mr[c] + one_minus_beta_1 * g[c];
        const float vc = beta_2 * vr[c] + one_minus_beta_2 * (g[c] * g[c]);
        mr[c] = mc;
        vr[c] = vc;
        w[c] = w[c] - (step_size * mc) / (std::sqrt(vc) + epsilon);
      }
    }
  }
};

class MatrixFactorizationAdamEpochOp : public tf::OpKernel {
 public:
  explicit MatrixFactorizationAdamEpochOp(tf::OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("beta_1", &beta_1_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("beta_2", &beta_2_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("epsilon", &epsilon_));
  }

  void Compute(tf::OpKernelContext* ctx) override TF_NO_THREAD_SAFETY_ANALYSIS {
    // Exclusive locks for the whole epoch, copy-on-read as for sparse updates.
    auto locks = tf::MaybeLockVariableInputMutexesInOrder<CPUDevice, float>(
        ctx, /*do_lock=*/true, /*sparse=*/true, {0, 1, 2, 3, 4, 5});
    tf::Tensor tensors[6];
    for (int i = 0; i < 6; ++i) {
      OP_REQUIRES_OK(ctx, tf::GetInputTensorFromVariable<CPUDevice, float>(
                              ctx, i, /*lock_held=*/true, /*sparse=*/true, &tensors[i]));
      OP_REQUIRES(ctx, tensors[i].dtype() == tf::DT_FLOAT,
                  tf::errors::InvalidArgument("tables and moments must be float32"));
    }
    const tf::TensorShape& user_shape = tensors[0].shape();
    const tf::TensorShape& item_shape = tensors[1].shape();
    OP_REQUIRES(ctx, user_shape.dims() == 2 && item_shape.dims() == 2 &&
                         user_shape.dim_size(1) == item_shape.dim_size(1) &&
                         user_shape.dim_size(1) >= 1,
                tf::errors::InvalidArgument(
                    "the tables must be [rows, factors + 1] with one column count, got ",
                    user_shape.DebugString(), " and ", item_shape.DebugString()));
    OP_REQUIRES(ctx, tensors[2].shape() == user_shape && tensors[3].shape() == user_shape &&
                         tensors[4].shape() == item_shape && tensors[5].shape() == item_shape,
                tf::errors::InvalidArgument("each moment must have its table's shape"));
    const tf::Tensor& user = ctx->input(6);
    const tf::Tensor& item = ctx->input(7);
    const tf::Tensor& rating = ctx->input(8);
    const int64_t size = rating.NumElements();
    OP_REQUIRES(ctx, user.NumElements() == size && item.NumElements() == size,
                tf::errors::InvalidArgument("user, item and rating must have one length"));
    const int64_t columns = user_shape.dim_size(1);
    const int64_t user_rows = user_shape.dim_size(0), item_rows = item_shape.dim_size(0);
    const tf::Tensor& order = ctx->input(9);
    const tf::Tensor& user_weight = ctx->input(10);
    const tf::Tensor& item_weight = ctx->input(11);
    const bool weighted = user_weight.NumElements() > 0 || item_weight.NumElements() > 0;
    OP_REQUIRES(ctx, !weighted || (user_weight.NumElements() == user_rows &&
                                   item_weight.NumElements() == item_rows),
                tf::errors::InvalidArgument("row weights must be empty or one per table row"));
    const tf::Tensor& penalty = ctx->input(12);
    OP_REQUIRES(ctx, penalty.NumElements() == columns,
                tf::errors::InvalidArgument("penalty must have one value per table column"));
    const tf::Tensor& range = ctx->input(17);
    OP_REQUIRES(ctx, range.NumElements() == 2,
                tf::errors::InvalidArgument("rating_range must be [min, max]"));
    const int64_t batch_size = ctx->input(16).scalar<int32_t>()();
    OP_REQUIRES(ctx, batch_size > 0, tf::errors::InvalidArgument("batch_size must be > 0"));
    const int threads = std::max(1, std::min(ctx->input(18).scalar<int32_t>()(), 64));
    const int32_t* users = user.flat<int32_t>().data();
    const int32_t* items = item.flat<int32_t>().data();
    for (int64_t i = 0; i < size; ++i) {
      OP_REQUIRES(ctx, users[i] >= 0 && users[i] < user_rows,
                  tf::errors::InvalidArgument("user index ", users[i], " at ", i,
                                              " is not in [0, ", user_rows, ")"));
      OP_REQUIRES(ctx, items[i] >= 0 && items[i] < item_rows,
                  tf::errors::InvalidArgument("item index ", items[i], " at ", i,
                                              " is not in [0, ", item_rows, ")"));
    }
    const bool ordered = order.NumElements() > 0;
    const int64_t n = ordered ? order.NumElements() : size;
    const int32_t* positions = ordered ? order.flat<int32_t>().data() : nullptr;
    for (int64_t i = 0; ordered && i < n; ++i) {
      OP_REQUIRES(ctx, positions[i] >= 0 && positions[i] < size,
                  tf::errors::InvalidArgument("order entry ", positions[i], " at ", i,
                                              " is not in [0, ", size, ")"));
    }

    Epoch epoch;
    epoch.n = n;
    epoch.columns = columns;
    epoch.batch_size = batch_size;
    epoch.rating = rating.flat<float>().data();
    epoch.penalty = penalty.flat<float>().data();
    epoch.mu = ctx->input(13).scalar<float>()();
    epoch.learning_rate = ctx->input(14).scalar<float>()();
    epoch.first_step = ctx->input(15).scalar<int64_t>()();
    epoch.rating_min = range.flat<float>()(0);
    epoch.rating_max = range.flat<float>()(1);
    epoch.beta_1 = beta_1_;
    epoch.beta_2 = beta_2_;
    epoch.epsilon = epsilon_;
    Side* sides[2] = {&epoch.user, &epoch.item};
    for (int s = 0; s < 2; ++s) {
      sides[s]->table = tensors[s].flat<float>().data();
      sides[s]->m = tensors[2 + 2 * s].flat<float>().data();
      sides[s]->v = tensors[3 + 2 * s].flat<float>().data();
      sides[s]->index = s == 0 ? users : items;
      sides[s]->weight =
          weighted ? (s == 0 ? user_weight : item_weight).flat<float>().data() : nullptr;
      sides[s]->gradient.resize(std::min(batch_size, std::max<int64_t>(n, 1)) * columns);
    }
    if (ordered) epoch.Gather(positions, threads);
    epoch.Run(threads);

    tf::Tensor* totals;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, tf::TensorShape({4}), &totals));
    auto out = totals->flat<double>();
    out(0) = out(2) = out(3) = 0.0;
    for (const auto& part : epoch.totals) {  // in thread order: the same sums every run
      out(0) += part[0];
      out(2) += part[1];
      out(3) += part[2];
    }
    out(1) = static_cast<double>(n);
  }

 private:
  struct Epoch {
    int64_t n, columns, batch_size, first_step;
    const float* rating;
    const float* penalty;
    float mu, learning_rate, rating_min, rating_max, beta_1, beta_2, epsilon;
    Side user, item;
    std::vector<std::array<double, 3>> totals;  // per thread: objective, squared, absolute
    std::vector<int32_t> gathered_user, gathered_item;  // with an order: the columns in it
    std::vector<float> gathered_rating;

    // Copies the columns into the order of positions[0, n), a contiguous part
    // per thread, and trains on the copies.
    void Gather(const int32_t* positions, int threads) {
      gathered_user.resize(n);
      gathered_item.resize(n);
      gathered_rating.resize(n);
      constexpr int64_t kAhead = 16;
      auto gather = [&](int part) {
        const int64_t low = n * part / threads, high = n * (part + 1) / threads;
        for (int64_t i = low; i < high; ++i) {
          if (i + kAhead < high) {
            const int64_t ahead = positions[i + kAhead];
            __builtin_prefetch(user.index + ahead);
            __builtin_prefetch(item.index + ahead);
            __builtin_prefetch(rating + ahead);
          }
          const int64_t r = positions[i];
          gathered_user[i] = user.index[r];
          gathered_item[i] = item.index[r];
          gathered_rating[i] = rating[r];
        }
      };
      std::vector<std::thread> helpers;
      for (int t = 1; t < threads; ++t) helpers.emplace_back(gather, t);
      gather(0);
      for (auto& helper : helpers) helper.join();
      user.index = gathered_user.data();
      item.index = gathered_item.data();
      rating = gathered_rating.data();
    }

    void Run(int threads) {
      totals.assign(threads, {0.0, 0.0, 0.0});
      SpinBarrier barrier(threads);
      std::vector<std::thread> helpers;
      for (int t = 1; t < threads; ++t) {
        helpers.emplace_back([this, t, threads, &barrier] { Work(t, threads, &barrier); });
      }
      Work(0, threads, &barrier);
      for (auto& helper : helpers) helper.join();
    }

    // Thread `part` of `parts`: its share of every batch, in step with the others.
    void Work(int part, int parts, SpinBarrier* barrier) {
      const float one_minus_beta_1 = 1.0f - beta_1, one_minus_beta_2 = 1.0f - beta_2;
      int64_t step = first_step;
      for (int64_t start = 0; start < n; start += batch_size, ++step) {
        const int64_t rows = std::min(batch_size, n - start);
        Forward(start, rows, rows * part / parts, rows * (part + 1) / parts, &totals[part]);
        barrier->Wait();
        if (part == 0 % parts) user.SumDuplicates(start, rows, columns);
        if (part == 1 % parts) item.SumDuplicates(start, rows, columns);
        barrier->Wait();
        // As trainer/rating/optimizers.py: the bias-corrected step size of this step.
        const float t = static_cast<float>(step);
        const float step_size = learning_rate * std::sqrt(1.0f - std::pow(beta_2, t)) /
                                (1.0f - std::pow(beta_1, t));
        user.Update(part, parts, columns, step_size, beta_1, one_minus_beta_1, beta_2,
                    one_minus_beta_2, epsilon);
        item.Update(part, parts, columns, step_size, beta_1, one_minus_beta_1, beta_2,
                    one_minus_beta_2, epsilon);
        barrier->Wait();
      }
    }

    // Predictions, objective and gradient rows (times 1 / rows) of batch rows [low, high).
    void Forward(int64_t start, int64_t rows, int64_t low, int64_t high,
                 std::array<double, 3>* sums) {
      const int64_t k = columns - 1;
      const float scale = 1.0f / static_cast<float>(rows);
      for (int64_t b = low; b < high; ++b) {
        const int64_t r = start + b;
        if (b + kPrefetchRows < high) {
          Prefetch(user.table + static_cast<int64_t>(user.index[r + kPrefetchRows]) * columns,
                   columns);
          Prefetch(item.table + static_cast<int64_t>(item.index[r + kPrefetchRows]) * columns,
                   columns);
        }
        const int32_t u = user.index[r], i = item.index[r];
        const float* p = user.table + static_cast<int64_t>(u) * columns;
        const float* q = item.table + static_cast<int64_t>(i) * columns;
        const float wu = user.weight ? user.weight[u] : 1.0f;
        const float wi = item.weight ? item.weight[i] : 1.0f;
        float dot = 0.0f;
        for (int64_t c = 0; c < k; ++c) dot += p[c] * q[c];
        const float prediction = mu + p[k] + q[k] + dot;
        const float error = prediction - rating[r];
        const float twice_error = 2.0f * error;
        float* gu = user.gradient.data() + b * columns;
        float* gi = item.gradient.data() + b * columns;
        float user_penalty = 0.0f, item_penalty = 0.0f;
        for (int64_t c = 0; c < columns; ++c) {
          const float pu = penalty[c] * wu, pi = penalty[c] * wi;
          user_penalty += pu * (p[c] * p[c]);
          item_penalty += pi * (q[c] * q[c]);
          gu[c] = (twice_error * (c < k ? q[c] : 1.0f) + 2.0f * pu * p[c]) * scale;
          gi[c] = (twice_error * (c < k ? p[c] : 1.0f) + 2.0f * pi * q[c]) * scale;
        }
        (*sums)[0] += static_cast<double>(error * error + user_penalty + item_penalty);
        const float clipped =
            std::min(std::max(prediction, rating_min), rating_max) - rating[r];
        (*sums)[1] += static_cast<double>(clipped) * clipped;
        (*sums)[2] += std::abs(static_cast<double>(clipped));
      }
    }
  };

  float beta_1_, beta_2_, epsilon_;
};

REGISTER_KERNEL_BUILDER(Name("MatrixFactorizationAdamEpoch").Device(tf::DEVICE_CPU),
                        MatrixFactorizationAdamEpochOp);

}  // namespace
}  // namespace movielens
