// An epoch's order of the ratings: the permutation of 0 .. size - 1 that
// tf.random.experimental.stateless_shuffle(tf.range(size), seed) returns,
// bit for bit, made faster.
//
// TensorFlow's kernel (shuffle_common.h's RandomShuffle) copies the range and
// runs Fisher-Yates on it: for i = 0 .. size - 2 it swaps entry i with entry
// i + u_i % (size - i), u_i the i-th 32-bit output of a Philox generator
// started at the seed's key and counter.  Entry i is read in order; the other
// is anywhere in 4 x size bytes (72 MB for 18M ratings), so each step waits
// for memory.  The u_i do not depend on the entries, so this op draws them
// 32 steps ahead and fetches each step's far entry into the cache while the
// steps before it run.  Same draws, same swaps, same order of swaps: the same
// permutation, for about a third of the CPU time at 18M ratings
// (docs/performance.md#per-epoch-evaluation).
//
// Built by trainer/ops/kernels.py with the compiler flags TensorFlow reports.

#include <cstdint>
#include <limits>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/lib/random/philox_random.h"
#include "tensorflow/core/lib/random/random_distributions.h"

namespace movielens {
namespace {

namespace tf = ::tensorflow;

REGISTER_OP("StatelessShuffledRange")
    .Input("size: int64")
    .Input("key: uint64")
    .Input("counter: uint64")
    .Output("order: int32")
    .SetShapeFn([](tf::shape_inference::InferenceContext* c) {
      c->set_output(0, c->Vector(c->UnknownDim()));
      return absl::OkStatus();
    })
    .Doc(R"doc(
tf.random.experimental.stateless_shuffle(tf.range(size, dtype=tf.int32), seed).

key, counter: the Philox key [1] and counter [2] of the seed, as
  tf.raw_ops.StatelessRandomGetKeyCounter gives them on a CPU.
)doc");

// Steps drawn ahead of the swap that uses them.
constexpr int64_t kAhead = 32;

class StatelessShuffledRangeOp : public tf::OpKernel {
 public:
  explicit StatelessShuffledRangeOp(tf::OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(tf::OpKernelContext* ctx) override {
    const int64_t size = ctx->input(0).scalar<int64_t>()();
    OP_REQUIRES(ctx, size >= 0 && size <= std::numeric_limits<int32_t>::max(),
                tf::errors::InvalidArgument("size must be in [0, 2^31), got ", size));
    const tf::Tensor& key = ctx->input(1);
    const tf::Tensor& counter = ctx->input(2);
    OP_REQUIRES(ctx, key.NumElements() == 1 && counter.NumElements() == 2,
                tf::errors::InvalidArgument("key must be [1] and counter [2] (Philox)"));
    tf::Tensor* out;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, tf::TensorShape({size}), &out));
    int32_t* order = out->flat<int32_t>().data();
    for (int64_t i = 0; i < size; ++i) order[i] = static_cast<int32_t>(i);
    if (size <= 1) return;
    // As random_ops_util.h's GetPhiloxRandomFromCounterKeyMem: low 32 bits first.
    const uint64_t* k = key.flat<tf::uint64>().data();
    const uint64_t* c = counter.flat<tf::uint64>().data();
    tf::random::PhiloxRandom::ResultType counter_words;
    tf::random::PhiloxRandom::Key key_words;
    counter_words[0] = static_cast<uint32_t>(c[0]);
    counter_words[1] = static_cast<uint32_t>(c[0] >> 32);
    counter_words[2] = static_cast<uint32_t>(c[1]);
    counter_words[3] = static_cast<uint32_t>(c[1] >> 32);
    key_words[0] = static_cast<uint32_t>(k[0]);
    key_words[1] = static_cast<uint32_t>(k[0] >> 32);
    tf::random::PhiloxRandom philox(counter_words, key_words);
    tf::random::SingleSampleAdapter<tf::random::PhiloxRandom> single(&philox);
    const int64_t steps = size - 1;
    // The far entry of step s, drawn in step order, in slot s % kAhead.
    int64_t far[kAhead];
    auto draw = [&](int64_t step) {
      const uint32_t span = static_cast<uint32_t>(size - step);
      return step + static_cast<int64_t>(single() % span);
    };
    for (int64_t s = 0; s < std::min(kAhead, steps); ++s) {
      far[s] = draw(s);
      __builtin_prefetch(order + far[s], 1);
    }
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t j = far[s % kAhead];
      if (s + kAhead < steps) {
        far[s % kAhead] = draw(s + kAhead);
        __builtin_prefetch(order + far[s % kAhead], 1);
      }
      const int32_t held = order[s];
      order[s] = order[j];
      order[j] = held;
    }
  }
};

REGISTER_KERNEL_BUILDER(Name("StatelessShuffledRange").Device(tf::DEVICE_CPU),
                        StatelessShuffledRangeOp);

}  // namespace
}  // namespace movielens
