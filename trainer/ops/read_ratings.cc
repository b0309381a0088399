// Reads one TFRecord shard of the preprocessing output into three columns.
//
// tf.data spends about 1 us a record on a shard of 20M small examples (its
// per-element iteration, not the decompression); this op reads the records
// with TensorFlow's own record reader and decodes only the three features the
// trainer needs from each tf.train.Example, in file order: int64 `user` and
// `item` (as int32), float `rating`.  Other features are skipped.  A record
// without one of the three, with more than one value, or that is not an
// Example fails the op with the record's number, as tf.io.parse_example would.
//
// Built by trainer/ops/kernels.py with the fused epoch op.

#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/lib/io/record_reader.h"
#include "tensorflow/core/platform/env.h"

namespace movielens {
namespace {

namespace tf = ::tensorflow;

REGISTER_OP("ReadRatingShard")
    .Input("path: string")
    .Output("user: int32")
    .Output("item: int32")
    .Output("rating: float")
    .Attr("compression: {'', 'GZIP', 'ZLIB'} = 'GZIP'")
    .SetIsStateful()  // reads a file: never folded or deduplicated
    .SetShapeFn([](tf::shape_inference::InferenceContext* c) {
      for (int i = 0; i < 3; ++i) c->set_output(i, c->Vector(c->UnknownDim()));
      return absl::OkStatus();
    })
    .Doc(R"doc(
Reads the user, item and rating features of every tf.train.Example in one
TFRecord file, in file order.
)doc");

// A cursor over protobuf wire format.
class Wire {
 public:
  Wire(const char* data, size_t size) : p_(data), end_(data + size) {}

  bool done() const { return p_ >= end_; }

  bool Varint(uint64_t* value) {
    uint64_t result = 0;
    for (int shift = 0; shift < 64 && p_ < end_; shift += 7) {
      const uint8_t byte = static_cast<uint8_t>(*p_++);
      result |= static_cast<uint64_t>(byte & 0x7f) << shift;
      if (!(byte & 0x80)) {
        *value = result;
        return true;
      }
    }
    return false;
  }

  // A length-delimited field's bytes.
  bool Bytes(Wire* out) {
    uint64_t size;
    if (!Varint(&size) || size > static_cast<uint64_t>(end_ - p_)) return false;
    *out = Wire(p_, size);
    p_ += size;
    return true;
  }

  bool Fixed32(uint32_t* value) {
    if (end_ - p_ < 4) return false;
    std::memcpy(value, p_, 4);
    p_ += 4;
    return true;
  }

  // Skips a field of this wire type.
  bool Skip(uint64_t wire_type) {
    uint64_t ignored;
    Wire bytes(nullptr, 0);
    switch (wire_type) {
      case 0:
        return Varint(&ignored);
      case 1:
        return Advance(8);
      case 2:
        return Bytes(&bytes);
      case 5:
        return Advance(4);
      default:
        return false;
    }
  }

  bool Advance(int64_t bytes) {
    if (end_ - p_ < bytes) return false;
    p_ += bytes;
    return true;
  }

  bool Equals(const char* text) const {
    const size_t size = std::strlen(text);
    return static_cast<size_t>(end_ - p_) == size && std::memcmp(p_, text, size) == 0;
  }

 private:
  const char* p_;
  const char* end_;
};

enum Key { kUser = 0, kItem = 1, kRating = 2, kOther = 3 };

// Reads one value of a list: an int64 varint (kind 3) or a float (kind 2).
bool ReadOne(Wire* wire, uint64_t kind, double* value) {
  if (kind == 3) {
    uint64_t raw;
    if (!wire->Varint(&raw)) return false;
    *value = static_cast<double>(static_cast<int64_t>(raw));
    return true;
  }
  uint32_t raw;
  if (!wire->Fixed32(&raw)) return false;
  float f;
  std::memcpy(&f, &raw, 4);
  *value = f;
  return true;
}

// The value of a Feature message holding exactly one int64 (kind 3:
// Int64List) or float (kind 2: FloatList), packed or not.
bool SingleValue(Wire feature, uint64_t kind, double* value) {
  int values = 0;
  while (!feature.done()) {
    uint64_t tag;
    if (!feature.Varint(&tag)) return false;
    const uint64_t field = tag >> 3;
    if (field != kind) {
      if (field >= 1 && field <= 3) return false;  // a list of another type
      if (!feature.Skip(tag & 7)) return false;
      continue;
    }
    Wire list(nullptr, 0);
    if ((tag & 7) != 2 || !feature.Bytes(&list)) return false;
    while (!list.done()) {
      uint64_t list_tag;
      if (!list.Varint(&list_tag) || (list_tag >> 3) != 1) return false;
      const uint64_t wire_type = list_tag & 7;
      if (wire_type == 2) {  // packed
        Wire packed(nullptr, 0);
        if (!list.Bytes(&packed)) return false;
        while (!packed.done()) {
          if (!ReadOne(&packed, kind, value)) return false;
          ++values;
        }
      } else if (wire_type == (kind == 3 ? 0u : 5u)) {
        if (!ReadOne(&list, kind, value)) return false;
        ++values;
      } else {
        return false;
      }
    }
  }
  return values == 1;
}

class ReadRatingShardOp : public tf::OpKernel {
 public:
  explicit ReadRatingShardOp(tf::OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("compression", &compression_));
  }

  void Compute(tf::OpKernelContext* ctx) override {
    const std::string path(ctx->input(0).scalar<tf::tstring>()());
    std::unique_ptr<tf::RandomAccessFile> file;
    OP_REQUIRES_OK(ctx, ctx->env()->NewRandomAccessFile(path, &file));
    auto options = tf::io::RecordReaderOptions::CreateRecordReaderOptions(compression_);
    options.buffer_size = 4 << 20;
    tf::io::SequentialRecordReader reader(file.get(), options);
    std::vector<int32_t> users, items;
    std::vector<float> ratings;
    tf::tstring record;
    for (int64_t number = 0;; ++number) {
      const absl::Status status = reader.ReadRecord(&record);
      if (absl::IsOutOfRange(status)) break;
      OP_REQUIRES_OK(ctx, status);
      double values[3];
      bool found[3] = {false, false, false};
      OP_REQUIRES(ctx, Decode(record, values, found),
                  tf::errors::InvalidArgument(
                      path, ": record ", number,
                      " is not a tf.train.Example with one int64 user, one int64 item "
                      "and one float rating"));
      for (int k = 0; k < 2; ++k) {
        OP_REQUIRES(ctx, values[k] >= 0 && values[k] <= std::numeric_limits<int32_t>::max(),
                    tf::errors::InvalidArgument(path, ": record ", number,
                                                " has an index out of int32 range"));
      }
      users.push_back(static_cast<int32_t>(values[kUser]));
      items.push_back(static_cast<int32_t>(values[kItem]));
      ratings.push_back(static_cast<float>(values[kRating]));
    }
    Output(ctx, 0, users);
    Output(ctx, 1, items);
    Output(ctx, 2, ratings);
  }

 private:
  // Finds the three features in an Example; true if each occurs once.
  static bool Decode(const tf::tstring& record, double* values, bool* found) {
    Wire example(record.data(), record.size());
    while (!example.done()) {
      uint64_t tag;
      if (!example.Varint(&tag)) return false;
      if (tag != ((1 << 3) | 2)) {  // Example.features
        if (!example.Skip(tag & 7)) return false;
        continue;
      }
      Wire features(nullptr, 0);
      if (!example.Bytes(&features)) return false;
      while (!features.done()) {
        uint64_t entry_tag;
        Wire entry(nullptr, 0);
        if (!features.Varint(&entry_tag)) return false;
        if (entry_tag != ((1 << 3) | 2)) {  // Features.feature map entry
          if (!features.Skip(entry_tag & 7)) return false;
          continue;
        }
        if (!features.Bytes(&entry)) return false;
        Key key = kOther;
        Wire value(nullptr, 0);
        bool has_value = false;
        while (!entry.done()) {
          uint64_t field;
          if (!entry.Varint(&field)) return false;
          Wire bytes(nullptr, 0);
          if ((field & 7) != 2 || !entry.Bytes(&bytes)) return false;
          if ((field >> 3) == 1) {
            key = bytes.Equals("user") ? kUser
                : bytes.Equals("item") ? kItem
                : bytes.Equals("rating") ? kRating : kOther;
          } else if ((field >> 3) == 2) {
            value = bytes;
            has_value = true;
          }
        }
        if (key == kOther) continue;
        if (found[key] || !has_value ||
            !SingleValue(value, key == kRating ? 2 : 3, &values[key])) {
          return false;
        }
        found[key] = true;
      }
    }
    return found[kUser] && found[kItem] && found[kRating];
  }

  template <typename T>
  static void Output(tf::OpKernelContext* ctx, int index, const std::vector<T>& column) {
    tf::Tensor* out;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            index, tf::TensorShape({static_cast<int64_t>(column.size())}),
                            &out));
    if (!column.empty()) {
      std::memcpy(out->flat<T>().data(), column.data(), column.size() * sizeof(T));
    }
  }

  std::string compression_;
};

REGISTER_KERNEL_BUILDER(Name("ReadRatingShard").Device(tf::DEVICE_CPU), ReadRatingShardOp);

}  // namespace
}  // namespace movielens
