// Exact top-k of the last axis of a float32 array, as an XLA FFI handler for CPU.
//
// Same result as XLA's TopK (jax.lax.top_k): per row, the indices of the k
// largest entries in decreasing order, ties towards the lower index, under the
// total order -NaN < -inf < ... < -0.0 < 0.0 < ... < inf < NaN of the float
// bits. Only the indices are returned; the caller gathers the values (which
// also gives their gradient).
//
// Per row, when there are at least k groups of 16 entries (else 8, else 4):
// a key reached by at least k group maxima is a lower bound on the k-th
// largest entry (k distinct groups reach it). One vectorised pass computes the
// group maxima, two 8-bit histograms of their 16-bit prefixes give a tight such
// key, and only the entries of the few groups that reach it are ranked. Rows
// too short for that (n < 4 k): a running filter (a buffer of candidates and
// the k-th best key so far, entries tested 16 at a time and the buffer cut
// back to the best k when full). Rows are spread over XLA's intra-op thread
// pool.

#include <algorithm>
#include <atomic>
#include <climits>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Sortable key of a float32: order of the keys as int32 = total order above.
inline int32_t Key(float v) {
  int32_t i;
  std::memcpy(&i, &v, sizeof(i));
  return i ^ ((i >> 31) & 0x7FFFFFFF);
}

// The float whose key is `key` (the map is its own inverse on the bits).
inline float FloatOf(int32_t key) {
  int32_t i = key ^ ((key >> 31) & 0x7FFFFFFF);
  float v;
  std::memcpy(&v, &i, sizeof(v));
  return v;
}

// (key, index) packed so that a larger packed value ranks first: key in the
// high word (sign flipped to make it unsigned-ordered), ~index in the low word
// (a lower index ranks first among equal keys).
inline uint64_t Pack(int32_t key, uint32_t index) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(key) ^ 0x80000000u) << 32) |
         static_cast<uint64_t>(~index);
}

inline uint32_t Index(uint64_t packed) { return ~static_cast<uint32_t>(packed); }

// GCC/Clang vector extensions: plain SIMD on any target (SSE2, AVX, NEON).
typedef float F4 __attribute__((vector_size(16)));
typedef int32_t I4 __attribute__((vector_size(16)));

constexpr int64_t kLanes = 16;  // entries per filter test

// Largest key of the `g` floats at `xs`, g a multiple of 4.
inline int32_t GroupMaxKey(const float* xs, int64_t g) {
  I4 m = {INT32_MIN, INT32_MIN, INT32_MIN, INT32_MIN};
  for (int64_t l = 0; l < g; l += 4) {
    I4 v;
    std::memcpy(&v, xs + l, sizeof(v));
    v ^= (v >> 31) & 0x7FFFFFFF;
    m = (v > m) ? v : m;
  }
  int32_t a = m[0] > m[1] ? m[0] : m[1];
  int32_t b = m[2] > m[3] ? m[2] : m[3];
  return a > b ? a : b;
}

// A key t such that at least k of `keys` are >= t, close to the k-th
// largest: the 16-bit prefix of the k-th largest (two 8-bit histograms).
// Within that prefix the floats differ by at most 2^-7 relatively.
int32_t KthPrefix(const std::vector<int32_t>& keys, int64_t k) {
  uint32_t hist[256];
  auto walk = [&](int64_t above, uint32_t& bucket) {
    for (int b = 255; b >= 0; --b) {
      if (above + hist[b] >= static_cast<uint64_t>(k)) {
        bucket = static_cast<uint32_t>(b);
        return above;
      }
      above += hist[b];
    }
    bucket = 0;  // not reached: at least k keys
    return above;
  };
  std::memset(hist, 0, sizeof(hist));
  for (int32_t key : keys) ++hist[(static_cast<uint32_t>(key) ^ 0x80000000u) >> 24];
  uint32_t hi, lo;
  int64_t above = walk(0, hi);
  std::memset(hist, 0, sizeof(hist));
  for (int32_t key : keys) {
    uint32_t u = static_cast<uint32_t>(key) ^ 0x80000000u;
    if ((u >> 24) == hi) ++hist[(u >> 16) & 0xFF];
  }
  walk(above, lo);
  return static_cast<int32_t>(((hi << 24) | (lo << 16)) ^ 0x80000000u);
}

// Whether all kLanes floats at `xs` are below `t` (false if any is NaN).
inline bool AllBelow(const float* xs, float t) {
  F4 tv = {t, t, t, t};
  I4 m = {-1, -1, -1, -1};
  for (int64_t l = 0; l < kLanes; l += 4) {
    F4 v;
    std::memcpy(&v, xs + l, sizeof(v));
    m &= (v < tv);
  }
  return (m[0] & m[1] & m[2] & m[3]) != 0;
}

// Per-thread scratch.
struct Scratch {
  std::vector<uint64_t> buf;   // packed candidates
  std::vector<int32_t> gmax;   // group maxima
};

// Sorted top-k of buf (packed entries) written as indices to out.
void Emit(std::vector<uint64_t>& buf, int64_t k, int32_t* out) {
  auto greater = std::greater<uint64_t>();
  if (static_cast<int64_t>(buf.size()) > k) {
    std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.end(), greater);
    buf.resize(k);
  }
  std::sort(buf.begin(), buf.end(), greater);
  for (int64_t i = 0; i < k; ++i) out[i] = static_cast<int32_t>(Index(buf[i]));
}

// Rows short relative to k: a running filter. The buffer starts with the
// first k entries and the threshold is the k-th best key so far; later
// entries have larger indices, so one beats the threshold exactly when its
// key is strictly larger. The buffer is cut back to the best k when full.
void RowTopKFilter(const float* x, int64_t n, int64_t k, int32_t* out,
                   std::vector<uint64_t>& buf) {
  auto greater = std::greater<uint64_t>();
  const int64_t cap = std::max<int64_t>(4 * k, 256);
  buf.clear();
  buf.reserve(cap + kLanes);
  int32_t thr = Key(x[0]);
  for (int64_t j = 0; j < k; ++j) {
    int32_t key = Key(x[j]);
    thr = std::min(thr, key);
    buf.push_back(Pack(key, static_cast<uint32_t>(j)));
  }
  // The filter compares floats, which vectorises well: an entry can beat the
  // threshold only if it is not below its float (NaNs and the -0.0/0.0 pair
  // pass the filter and are settled by the exact key test).
  float t = FloatOf(thr);
  int64_t j = k;
  for (; j + kLanes <= n; j += kLanes) {
    const float* xs = x + j;
    if (AllBelow(xs, t)) continue;
    for (int64_t l = 0; l < kLanes; ++l) {
      int32_t key = Key(xs[l]);
      if (key > thr) buf.push_back(Pack(key, static_cast<uint32_t>(j + l)));
    }
    if (static_cast<int64_t>(buf.size()) >= cap) {
      std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.end(), greater);
      buf.resize(k);
      thr = static_cast<int32_t>(static_cast<uint32_t>(buf[k - 1] >> 32) ^ 0x80000000u);
      t = FloatOf(thr);
    }
  }
  for (; j < n; ++j) {
    int32_t key = Key(x[j]);
    if (key > thr) buf.push_back(Pack(key, static_cast<uint32_t>(j)));
  }
  Emit(buf, k, out);
}

// Long rows (at least k groups of g entries): a key reached by at least k
// group maxima bounds the k-th largest entry from below (k distinct groups
// reach it); KthPrefix gives a tight one, and only the groups whose maximum
// reaches it are read again.
void RowTopKGroups(const float* x, int64_t n, int64_t k, int64_t g, int32_t* out, Scratch& s) {
  const int64_t groups = n / g;
  s.gmax.resize(groups);
  for (int64_t i = 0; i < groups; ++i) s.gmax[i] = GroupMaxKey(x + i * g, g);
  const int32_t thr = KthPrefix(s.gmax, k);
  const I4 tv = {thr, thr, thr, thr};
  std::vector<uint64_t>& buf = s.buf;
  buf.clear();
  for (int64_t i = 0; i < groups; ++i) {
    if (s.gmax[i] < thr) continue;
    for (int64_t l = 0; l < g; l += 4) {
      const int64_t j = i * g + l;
      I4 v;
      std::memcpy(&v, x + j, sizeof(v));
      v ^= (v >> 31) & 0x7FFFFFFF;
      I4 hit = v >= tv;
      if (!(hit[0] | hit[1] | hit[2] | hit[3])) continue;
      for (int e = 0; e < 4; ++e) {
        if (hit[e]) buf.push_back(Pack(v[e], static_cast<uint32_t>(j + e)));
      }
    }
  }
  for (int64_t j = groups * g; j < n; ++j) {
    int32_t key = Key(x[j]);
    if (key >= thr) buf.push_back(Pack(key, static_cast<uint32_t>(j)));
  }
  Emit(buf, k, out);
}

void RowTopK(const float* x, int64_t n, int64_t k, int32_t* out, Scratch& s) {
  if (k >= n) {
    s.buf.resize(n);
    for (int64_t j = 0; j < n; ++j) s.buf[j] = Pack(Key(x[j]), static_cast<uint32_t>(j));
    Emit(s.buf, n, out);
    return;
  }
  // Groups of 16 entries (8 or 4 when k is large), at least k of them.
  for (int64_t g = 16; g >= 4; g /= 2) {
    if (n / g >= k) {
      RowTopKGroups(x, n, k, g, out, s);
      return;
    }
  }
  RowTopKFilter(x, n, k, out, s.buf);
}

// Work shared by the caller and pool tasks. Held by shared_ptr: a task the
// pool starts after the caller has returned finds no rows left and exits
// without touching the buffers.
struct Job {
  const float* x;
  int32_t* out;
  int64_t rows, n, k, grain;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;

  void Run() {
    Scratch scratch;
    for (;;) {
      int64_t r0 = next.fetch_add(grain);
      if (r0 >= rows) return;
      int64_t r1 = std::min(rows, r0 + grain);
      for (int64_t r = r0; r < r1; ++r) RowTopK(x + r * n, n, k, out + r * k, scratch);
      if (done.fetch_add(r1 - r0) + (r1 - r0) == rows) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }
};

ffi::Error TopKImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                    ffi::ResultBuffer<ffi::S32> indices, int64_t k) {
  auto dims = x.dimensions();
  if (dims.size() == 0) return ffi::Error::InvalidArgument("top_k: input must have rank >= 1");
  const int64_t n = dims.back();
  if (k < 1 || k > n) return ffi::Error::InvalidArgument("top_k: need 1 <= k <= last dimension");
  if (n > 0x7FFFFFFF) return ffi::Error::InvalidArgument("top_k: last dimension too large");
  const int64_t rows = n == 0 ? 0 : static_cast<int64_t>(x.element_count()) / n;
  if (rows == 0) return ffi::Error::Success();
  auto job = std::make_shared<Job>();
  job->x = x.typed_data();
  job->out = indices->typed_data();
  job->rows = rows;
  job->n = n;
  job->k = k;
  // About 64k entries per grain keeps the scheduling cost negligible.
  job->grain = std::max<int64_t>(1, std::min<int64_t>(rows, (1 << 16) / std::max<int64_t>(n, 1)));
  const int64_t grains = (rows + job->grain - 1) / job->grain;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), grains - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([job]() { job->Run(); });
  job->Run();
  std::unique_lock<std::mutex> lock(job->mu);
  job->cv.wait(lock, [&]() { return job->done.load() == rows; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GsparseTopKF32, TopKImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("k"));
