// SwiGLU experts on the CPU, forward and backward, one task per block of rows sorted by expert.
//
// The Python version (moe_lib/kernels.py, ExpertSwiGLU) issues a dozen ATen ops from Python per
// expert and runs the tasks on Python worker threads; this file runs the same tasks from C++:
// `at::parallel_for` starts one worker per intra-op thread, each takes the next block from a shared
// counter (largest first, as the Python plan orders them) and runs its expert's whole chain with
// single-threaded GEMMs (BLAS's sgemm called inside a parallel region, with the arguments at::mm
// would pass: `gemm`), gathers rows with memcpy, and computes the activation between the GEMMs.
// Same math and same blocks as the Python tasks:
//
//   forward, row n of expert e:  [g, u] = x_n gate_up_e^T;  h = w_n silu(g) u;  out_n = h down_e^T
//   backward, with a = silu(g) u, s = sigmoid(g), dh = dy_n down_e:
//     dw_n = <dh, a>;  d down_e += dy^T (w a);  du = w dh silu(g);  dg = w dh u s (1 + g (1 - s));
//     dx_n = [dg, du] gate_up_e;  d gate_up_e += [dg, du]^T x_n
//
// exp is evaluated by `exp_approx` (range reduction to [-ln2/2, ln2/2] and a degree-7 Taylor
// polynomial, relative error about 1e-7), written so that the compiler vectorizes the loops.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

// The BLAS sgemm that torch's CPU build links (MKL in the x86 wheels), where the symbol is there.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace {

std::atomic<bool> direct_blas_on{true};

// A float32 matrix in memory: element (i, j) at p[i * rs + j * cs].
struct Mat {
  const float* p;
  int64_t rs, cs;
};

// c [m, n], row-major with row stride ldc, = a [m, k] @ b [k, n]. It makes the BLAS call that
// at::mm_out makes for these operands (torch's addmm for a row-major result: c^T = b^T a^T in
// BLAS's column-major terms, each operand transposed or not by its strides, the leading dimensions
// of size-1 dimensions normalized as torch's cpublas does), so the result has the same bits, without
// ATen's dispatch, checks and tensor views on each of the thousands of small GEMMs of a forward and
// backward. Falls back to at::mm_out where there is no sgemm_ symbol, where float32 matmuls may run
// in reduced precision (then ATen may not call sgemm_), or for strides BLAS cannot take.
void gemm(float* c, int64_t ldc, int64_t m, int64_t n, int64_t k, Mat a, Mat b) {
  if (m == 0 || n == 0) return;
  char ta = 0, tb = 0;
  int64_t lda = 0, ldb = 0, ldc_ = ldc;
  const bool direct = sgemm_ != nullptr && direct_blas_on.load(std::memory_order_relaxed) && k > 0 &&
                      at::globalContext().float32MatmulPrecision() == at::Float32MatmulPrecision::HIGHEST;
  if (direct) {
    if (b.cs == 1 && b.rs >= std::max<int64_t>(1, n)) {  // BLAS's first operand: b
      ta = 'n';
      lda = b.rs;
    } else if (b.rs == 1 && b.cs >= std::max<int64_t>(1, k)) {
      ta = 't';
      lda = b.cs;
    }
    if (a.cs == 1 && a.rs >= std::max<int64_t>(1, k)) {  // the second: a
      tb = 'n';
      ldb = a.rs;
    } else if (a.rs == 1 && a.cs >= std::max<int64_t>(1, m)) {
      tb = 't';
      ldb = a.cs;
    }
  }
  const int64_t M = n, N = m, K = k;  // of c^T [n, m]
  if (ta && tb) {
    if (N == 1) ldc_ = M;
    if (ta != 'n') {
      if (M == 1) lda = K;
    } else if (K == 1) {
      lda = M;
    }
    if (tb != 'n') {
      if (K == 1) ldb = N;
    } else if (N == 1) {
      ldb = K;
    }
  }
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  const bool fits = ta && tb && M <= kMax && N <= kMax && K <= kMax && lda <= kMax && ldb <= kMax &&
                    ldc_ <= kMax && lda >= std::max<int64_t>(1, ta == 'n' ? M : K) &&
                    ldb >= std::max<int64_t>(1, tb == 'n' ? K : N) && ldc_ >= std::max<int64_t>(1, M);
  if (!fits) {
    const auto opts = at::TensorOptions().dtype(at::kFloat);
    at::Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, opts);
    at::mm_out(out, at::from_blob(const_cast<float*>(a.p), {m, k}, {a.rs, a.cs}, opts),
               at::from_blob(const_cast<float*>(b.p), {k, n}, {b.rs, b.cs}, opts));
    return;
  }
  const int m_ = static_cast<int>(M), n_ = static_cast<int>(N), k_ = static_cast<int>(K);
  const int lda_ = static_cast<int>(lda), ldb_ = static_cast<int>(ldb), ldc32 = static_cast<int>(ldc_);
  const float one = 1.0f, zero = 0.0f;
  sgemm_(&ta, &tb, &m_, &n_, &k_, &one, b.p, &lda_, a.p, &ldb_, &zero, c, &ldc32);
}

// Large results and saved products of the ops below (the [N, 2I] gate/up product kept for the
// backward, the weight gradients, dx) come from a pool of buffers this library keeps: a freed buffer
// goes back to the pool, and the next call of the same shape takes it again. A fresh tensor of more
// than 32 MB is always a fresh mmap whose pages fault in on first touch and are unmapped when
// freed (glibc's threshold); at d_model 512 and 4096 tokens, forward+backward allocated about
// 200 MB that way per call, 50-60 ms of page faults in a 340 ms step. Buffers under kPoolMin use
// torch's allocator. Cached (free) buffers are capped at MOE_LIB_POOL_MB (default 1024) MB; beyond
// that a freed buffer is returned to the system, and `pool_trim` returns them all.
constexpr size_t kPoolMin = size_t(1) << 20;

class BufferPool final : public c10::Allocator {
 public:
  BufferPool() {
    const char* mb = std::getenv("MOE_LIB_POOL_MB");
    cap_ = (mb && *mb ? static_cast<size_t>(std::strtoull(mb, nullptr, 10)) : size_t(1024)) << 20;
  }

  c10::DataPtr allocate(size_t n) override {
    n = std::max<size_t>(64, (n + 63) / 64 * 64);
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // the smallest free buffer that fits, if it wastes at most an eighth of it
      auto it = free_.lower_bound(n);
      if (it != free_.end() && it->first - n <= it->first / 8) {
        n = it->first;
        p = it->second;
        cached_ -= n;
        free_.erase(it);
      }
    }
    if (!p && posix_memalign(&p, 64, n) != 0) p = nullptr;
    TORCH_CHECK(p, "moe_lib: could not allocate ", n, " bytes");
    return {p, new Entry{this, p, n}, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // frees every cached buffer; returns the bytes freed
  int64_t trim() {
    std::multimap<size_t, void*> drop;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      drop.swap(free_);
      cached_ = 0;
    }
    int64_t bytes = 0;
    for (auto& [n, p] : drop) {
      bytes += static_cast<int64_t>(n);
      std::free(p);
    }
    return bytes;
  }

  int64_t cached() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(cached_);
  }

 private:
  struct Entry {
    BufferPool* pool;
    void* p;
    size_t n;
  };

  static void release(void* ctx) {
    auto* e = static_cast<Entry*>(ctx);
    BufferPool* pool = e->pool;
    bool keep = false;
    {
      std::lock_guard<std::mutex> lock(pool->mutex_);
      if (pool->cached_ + e->n <= pool->cap_) {
        pool->free_.emplace(e->n, e->p);
        pool->cached_ += e->n;
        keep = true;
      }
    }
    if (!keep) std::free(e->p);
    delete e;
  }

  std::mutex mutex_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0, cap_ = 0;
};

// never destroyed: tensors may outlive static destructors at exit
BufferPool& buffer_pool() {
  static BufferPool* pool = new BufferPool();
  return *pool;
}

// at::empty(sizes) of float32 on the CPU, from the pool when it is at least kPoolMin bytes
at::Tensor pooled_empty(at::IntArrayRef sizes) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  if (static_cast<size_t>(numel) * sizeof(float) < kPoolMin) return at::empty(sizes, opts);
  return at::detail::empty_generic(sizes, &buffer_pool(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   at::kFloat, std::nullopt);
}

int64_t pool_trim() { return buffer_pool().trim(); }
int64_t pool_cached() { return buffer_pool().cached(); }

inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// e[i] = exp(-g[i]) for i < m. A loop of its own, its results stored: when the clamp in exp_approx
// and the division by 1 + e sit in one loop, the compiler specializes the clamped lanes into a
// division by the constant 1 + exp(88), which yields subnormal results for ordinary inputs in every
// lane (then discarded by a blend); on Intel cores each subnormal result costs a microcode assist,
// and the fused loop ran 10x slower (24 ms instead of 2.3 ms for 3.1M elements on a Xeon with
// AVX-512). Stored first, the results are bitwise the same.
constexpr int64_t kChunk = 256;

inline void exp_neg(const float* g, float* e, int64_t m) {
#pragma omp simd
  for (int64_t i = 0; i < m; ++i) e[i] = exp_approx(-g[i]);
}

// h[r, i] = w[r] * silu(g[r, i]) * u[r, i], g and u the two halves of a row of gu [n, 2I]
void act_forward(const float* gu, float* h, const float* w, int64_t n, int64_t I) {
  alignas(64) float e[kChunk];
  for (int64_t r = 0; r < n; ++r) {
    const float wr = w ? w[r] : 1.0f;
    for (int64_t c = 0; c < I; c += kChunk) {
      const int64_t m = std::min(kChunk, I - c);
      const float* g = gu + r * 2 * I + c;
      const float* u = g + I;
      float* hr = h + r * I + c;
      exp_neg(g, e, m);
#pragma omp simd
      for (int64_t i = 0; i < m; ++i) hr[i] = g[i] / (1.0f + e[i]) * u[i] * wr;
    }
  }
}

// From gu = [g, u] [n, 2I] and dh = dy down_e [n, I]: dgu = [dg, du] [n, 2I], wa = w a [n, I],
// dw[r] = <dh_r, a_r> (when dw is given).
void act_backward(const float* gu, const float* dh, const float* w, float* dgu, float* wa, float* dw,
                  int64_t n, int64_t I) {
  alignas(64) float e[kChunk];
  for (int64_t r = 0; r < n; ++r) {
    const float wr = w ? w[r] : 1.0f;
    float dot = 0.0f;
    for (int64_t c = 0; c < I; c += kChunk) {
      const int64_t m = std::min(kChunk, I - c);
      const float* g = gu + r * 2 * I + c;
      const float* u = g + I;
      const float* dhr = dh + r * I + c;
      float* dg = dgu + r * 2 * I + c;
      float* du = dg + I;
      float* war = wa + r * I + c;
      exp_neg(g, e, m);
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < m; ++i) {
        const float gi = g[i], ui = u[i];
        const float s = 1.0f / (1.0f + e[i]);
        const float silu = gi * s;
        const float a = silu * ui;
        dot += dhr[i] * a;
        war[i] = a * wr;
        const float dhw = dhr[i] * wr;
        du[i] = dhw * silu;
        dg[i] = dhw * ui * (s * (1.0f + gi * (1.0f - s)));
      }
    }
    if (dw) dw[r] = dot;
  }
}

// rows [start, start + n) of src [*, H], or the rows token[start:start+n] of it copied into buffer:
// a pointer to n rows of row stride H
const float* rows_of(const at::Tensor& src, const int64_t* token, int64_t start, int64_t n, at::Tensor& buffer) {
  const int64_t H = src.size(1);
  const float* from = src.data_ptr<float>();
  if (!token) return from + start * H;
  float* to = buffer.data_ptr<float>();
  for (int64_t r = 0; r < n; ++r) {
    std::memcpy(to + r * H, from + token[start + r] * H, H * sizeof(float));
  }
  return to;
}

// t as a per-thread scratch buffer of at least [rows, cols] (rows are taken with narrow), reallocated
// only when it is missing or too small
void ensure_scratch(at::Tensor& t, int64_t rows, int64_t cols, const at::TensorOptions& opts) {
  if (!t.defined() || t.size(0) < rows || t.size(1) != cols) t = at::empty({rows, cols}, opts);
}

struct Block {
  int64_t expert, start, stop, slot;
};

std::vector<Block> read_blocks(const at::Tensor& blocks) {
  TORCH_CHECK(blocks.dim() == 2 && blocks.size(1) == 4 && blocks.scalar_type() == at::kLong,
              "blocks must be an int64 [B, 4] tensor of (expert, start, stop, slot)");
  auto b = blocks.contiguous();
  const int64_t* p = b.data_ptr<int64_t>();
  std::vector<Block> out(b.size(0));
  for (int64_t i = 0; i < b.size(0); ++i) out[i] = {p[4 * i], p[4 * i + 1], p[4 * i + 2], p[4 * i + 3]};
  return out;
}

int64_t max_rows(const std::vector<Block>& blocks) {
  int64_t most = 1;
  for (const auto& b : blocks) most = std::max(most, b.stop - b.start);
  return most;
}

// Runs body(i) for i in [0, n): on the intra-op threads (OpenMP: this file must be compiled with
// -fopenmp, or at::parallel_for runs serially), each taking the next i from a shared counter; on the
// calling thread alone when `parallel` is false. Inside the parallel region at::mm runs on one thread.
template <typename F>
void run_jobs(int64_t n, bool parallel, F&& body) {
  std::atomic<int64_t> next{0};
  const at::ThreadLocalState caller;  // grad and inference modes: OpenMP's workers do not inherit them
  auto drain = [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard same_modes(caller);
    for (int64_t worker = begin; worker < end; ++worker) {
      for (int64_t i = next++; i < n; i = next++) body(i);
    }
  };
  const int64_t workers = parallel ? std::min<int64_t>(at::get_num_threads(), n) : 1;
  if (workers <= 1) {
    drain(0, 1);
  } else {
    at::parallel_for(0, workers, 1, drain);
  }
}

// body(block) for every block, in their order (largest first, as the Python plan orders them)
template <typename F>
void run_blocks(const std::vector<Block>& blocks, bool parallel, F&& body) {
  run_jobs(static_cast<int64_t>(blocks.size()), parallel, [&](int64_t i) { body(blocks[i]); });
}

// The experts one op call runs: the routed experts (set 0: row n reads x[token[n]], scaled by w[n])
// and, optionally, the shared expert (set 1: rows of x in place, weight 1, its blocks over the tokens).
// Running both in one parallel region lets the shared expert's blocks fill the routed ones' tail,
// and the combine adds its rows to each token's sum (no separate call, add or dx accumulation).
struct Set {
  const float* gate_up;
  const float* down;
  int64_t I;
  const int64_t* token;
  const float* w;
  std::vector<Block> blocks;
  int64_t most;
};

struct Job {
  int set;
  const Block* block;
};

// every block of every set, the largest (rows x I) first, the routed blocks first among equals
std::vector<Job> jobs_of(const std::vector<Set>& sets) {
  std::vector<Job> jobs;
  for (int s = 0; s < static_cast<int>(sets.size()); ++s) {
    for (const auto& b : sets[s].blocks) jobs.push_back({s, &b});
  }
  std::stable_sort(jobs.begin(), jobs.end(), [&](const Job& a, const Job& b) {
    return (a.block->stop - a.block->start) * sets[a.set].I > (b.block->stop - b.block->start) * sets[b.set].I;
  });
  return jobs;
}

// blocks of rows within [0, n_rows), experts within [0, E), slots within [0, n_slots) when n_slots > 0
void check_blocks(const std::vector<Block>& blocks, int64_t E, int64_t n_rows, int64_t n_slots) {
  for (const auto& b : blocks) {
    TORCH_CHECK(b.expert >= 0 && b.expert < E && b.start >= 0 && b.start <= b.stop && b.stop <= n_rows &&
                    b.slot >= 0 && (n_slots <= 0 || b.slot < n_slots),
                "block (", b.expert, ", ", b.start, ", ", b.stop, ", ", b.slot, ") out of range: ", E,
                " experts, ", n_rows, " rows", n_slots > 0 ? ", slots " + std::to_string(n_slots) : std::string());
  }
}

void check_inputs(const at::Tensor& x, const std::optional<at::Tensor>& token,
                  const std::optional<at::Tensor>& weight, const at::Tensor& gate_up,
                  const at::Tensor& down, int64_t n_rows) {
  for (const auto* t : {&x, &gate_up, &down}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "expected contiguous float32 CPU tensors");
  }
  TORCH_CHECK(x.dim() == 2 && gate_up.dim() == 3 && down.dim() == 3, "x [T, H], gate_up [E, 2I, H], down [E, H, I]");
  TORCH_CHECK(gate_up.size(2) == x.size(1) && down.size(1) == x.size(1) && gate_up.size(1) == 2 * down.size(2),
              "gate_up [E, 2I, H] and down [E, H, I] do not match x [T, H]");
  if (token) {
    TORCH_CHECK(token->scalar_type() == at::kLong && token->is_contiguous() && token->numel() == n_rows,
                "token must be a contiguous int64 [N] tensor");
  } else {
    TORCH_CHECK(x.size(0) == n_rows, "without token, x must have one row per sorted row");
  }
  if (weight) {
    TORCH_CHECK(weight->scalar_type() == at::kFloat && weight->is_contiguous() && weight->numel() == n_rows,
                "weight must be a contiguous float32 [N] tensor");
  }
}

void check_positions(const at::Tensor& position, int64_t n_rows) {
  TORCH_CHECK(position.dim() == 2 && position.scalar_type() == at::kLong && position.is_contiguous(),
              "position must be a contiguous int64 [T, K] tensor");
  const int64_t* p = position.data_ptr<int64_t>();
  for (int64_t i = 0; i < position.numel(); ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] <= n_rows, "position ", p[i], " out of range [0, ", n_rows, "]");
  }
}

// [n_rows, H] rows that are summed per token before an op returns: a buffer kept by the calling
// thread from call to call (forward and backward take turns with it). A fresh tensor each call is a
// fresh mmap of tens of MB whose pages fault in on first touch: 11 ms per forward for the 48 MB of
// the d_model 512 layer at 4096 tokens, against 1 ms to rewrite a reused buffer.
// `which`: 0 the routed rows, 1 the shared expert's rows (summed into the same tokens' outputs).
at::Tensor kept_rows(int64_t n_rows, int64_t H, int which = 0) {
  thread_local at::Tensor rows[2];
  ensure_scratch(rows[which], std::max<int64_t>(n_rows, 1), H, at::TensorOptions().dtype(at::kFloat));
  return rows[which];
}

// y[t] = sum over k of rows[position[t, k]], position N (a dropped pair) adding nothing: in the
// order and float32 arithmetic of F.embedding_bag(position, rows, mode="sum") with a zero row N, so
// the same bits (up to the sign of a zero sum). With `extra` ([T, H], the shared expert's rows),
// extra[t] is added last, as `y + shared(x)` would add it.
at::Tensor combine_rows(const at::Tensor& rows, const at::Tensor& position, int64_t n_rows,
                        const float* extra = nullptr) {
  const int64_t T = position.size(0), K = position.size(1), H = rows.size(1);
  at::Tensor y = pooled_empty({T, H});
  const int64_t* pos = position.data_ptr<int64_t>();
  const float* r = rows.data_ptr<float>();
  float* out = y.data_ptr<float>();
  at::parallel_for(0, T, std::max<int64_t>(1, 16384 / std::max<int64_t>(H * K, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* yt = out + t * H;
      bool empty = true;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t p = pos[t * K + k];
        if (p >= n_rows) continue;
        const float* row = r + p * H;
        if (empty) {
          std::memcpy(yt, row, H * sizeof(float));
          empty = false;
        } else {
#pragma omp simd
          for (int64_t h = 0; h < H; ++h) yt[h] += row[h];
        }
      }
      if (extra) {
        const float* et = extra + t * H;
        if (empty) {
          std::memcpy(yt, et, H * sizeof(float));
        } else {
#pragma omp simd
          for (int64_t h = 0; h < H; ++h) yt[h] += et[h];
        }
      } else if (empty) {
        std::memset(yt, 0, H * sizeof(float));
      }
    }
  });
  return y;
}

// A set of experts: row n reads x[token[n]] (x's rows in place without token), scaled by w[n] (1
// without weight); its blocks checked against E experts, n_rows rows and n_slots slots (unchecked
// when 0).
Set expert_set(const std::optional<at::Tensor>& token, const std::optional<at::Tensor>& weight,
               const at::Tensor& gate_up, const at::Tensor& down, const at::Tensor& blocks, int64_t n_rows,
               int64_t n_slots) {
  Set set{gate_up.data_ptr<float>(), down.data_ptr<float>(), down.size(2), token ? token->data_ptr<int64_t>() : nullptr,
          weight ? weight->data_ptr<float>() : nullptr, read_blocks(blocks), 1};
  check_blocks(set.blocks, gate_up.size(0), n_rows, n_slots);
  set.most = max_rows(set.blocks);
  return set;
}

// The shared expert's weights and blocks, checked against x [T, H]: gate_up [1, 2I_s, H], down
// [1, H, I_s], blocks over the T rows of x (expert 0). It runs in the routed experts' call only when
// their rows are summed per token (`position`), its rows added to each token's sum.
Set shared_set(const at::Tensor& x, const std::optional<at::Tensor>& position, const std::optional<at::Tensor>& gate_up,
               const std::optional<at::Tensor>& down, const std::optional<at::Tensor>& blocks, int64_t n_slots) {
  TORCH_CHECK(gate_up && down && blocks, "the shared expert needs shared_gate_up, shared_down and shared_blocks");
  TORCH_CHECK(position, "the shared expert runs in the routed call only with position (its rows are summed in)");
  for (const auto* t : {&*gate_up, &*down}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 3 &&
                    t->size(0) == 1,
                "the shared expert's weights must be contiguous float32 CPU tensors [1, 2I, H] and [1, H, I]");
  }
  TORCH_CHECK(gate_up->size(2) == x.size(1) && down->size(1) == x.size(1) && gate_up->size(1) == 2 * down->size(2),
              "shared gate_up [1, 2I, H] and down [1, H, I] do not match x [T, H]");
  return expert_set(std::nullopt, std::nullopt, *gate_up, *down, *blocks, x.size(0), n_slots);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> swiglu_forward(
    const at::Tensor& x, const std::optional<at::Tensor>& token, const std::optional<at::Tensor>& weight,
    const at::Tensor& gate_up, const at::Tensor& down, const at::Tensor& blocks_t, int64_t n_rows,
    const std::optional<at::Tensor>& position, bool save, bool parallel,
    const std::optional<at::Tensor>& shared_gate_up, const std::optional<at::Tensor>& shared_down,
    const std::optional<at::Tensor>& shared_blocks) {
  check_inputs(x, token, weight, gate_up, down, n_rows);
  const int64_t H = x.size(1);
  std::vector<Set> sets{expert_set(token, weight, gate_up, down, blocks_t, n_rows, 0)};
  const bool shared = shared_gate_up || shared_down || shared_blocks;
  if (shared) sets.push_back(shared_set(x, position, shared_gate_up, shared_down, shared_blocks, 0));
  if (position) check_positions(*position, n_rows);
  // rows of each set: with `position` summed per token before returning (kept_rows); the gate/up
  // products are saved for the backward when `save`
  at::Tensor out[2], gu_all[2];
  for (size_t s = 0; s < sets.size(); ++s) {
    const int64_t rows = s == 0 ? n_rows : x.size(0);
    out[s] = position ? kept_rows(rows, H, static_cast<int>(s)) : pooled_empty({rows, H});
    gu_all[s] = save ? pooled_empty({rows, 2 * sets[s].I}) : at::empty({0}, x.options());
  }
  const auto jobs = jobs_of(sets);
  at::NoGradGuard no_grad;
  // per-thread scratch: gathered rows, the gate/up product when it is not saved, the activation
  run_jobs(static_cast<int64_t>(jobs.size()), parallel, [&](int64_t j) {
    thread_local at::Tensor xs, gu_buf[2], h[2];
    const int s = jobs[j].set;
    const Set& set = sets[s];
    const Block& b = *jobs[j].block;
    const int64_t n = b.stop - b.start, I = set.I;
    if (set.token) ensure_scratch(xs, set.most, H, x.options());
    if (!save) ensure_scratch(gu_buf[s], set.most, 2 * I, x.options());
    ensure_scratch(h[s], set.most, I, x.options());
    const float* xr = rows_of(x, set.token, b.start, n, xs);
    float* gu = save ? gu_all[s].data_ptr<float>() + b.start * 2 * I : gu_buf[s].data_ptr<float>();
    float* hr = h[s].data_ptr<float>();
    gemm(gu, 2 * I, n, 2 * I, H, {xr, H, 1}, {set.gate_up + b.expert * 2 * I * H, 1, H});
    act_forward(gu, hr, set.w ? set.w + b.start : nullptr, n, I);
    gemm(out[s].data_ptr<float>() + b.start * H, H, n, H, I, {hr, I, 1}, {set.down + b.expert * H * I, 1, I});
  });
  at::Tensor result = position ? combine_rows(out[0], *position, n_rows, shared ? out[1].data_ptr<float>() : nullptr)
                               : out[0];
  return {result, gu_all[0], shared ? gu_all[1] : at::empty({0}, x.options())};
}

// A weight gradient per slot [S, ...] -> per expert (its first E slots): the partial sums of a split
// expert (slots beyond E, in its blocks' order) added into its own slot, as
// grad[e] += grad[first:stop].sum(0) would add them, and zeros for experts without rows.
void reduce_slots(at::Tensor& grad, const std::vector<Block>& blocks, int64_t E) {
  if (grad.numel() == 0) return;
  const int64_t size = grad.numel() / grad.size(0);
  std::vector<std::vector<int64_t>> extra(E);
  std::vector<char> has_rows(E, 0);
  for (const auto& b : blocks) {
    if (b.stop > b.start) has_rows[b.expert] = 1;
    if (b.slot != b.expert) extra[b.expert].push_back(b.slot);
  }
  float* g = grad.data_ptr<float>();
  at::parallel_for(0, E, 1, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      float* ge = g + e * size;
      if (!has_rows[e]) {
        std::memset(ge, 0, size * sizeof(float));
        continue;
      }
      auto& slots = extra[e];
      if (slots.empty()) continue;
      std::sort(slots.begin(), slots.end());
      float* first = g + slots[0] * size;  // the sum of the partials, then added to the expert's slot
      for (size_t i = 1; i < slots.size(); ++i) {
        const float* p = g + slots[i] * size;
#pragma omp simd
        for (int64_t j = 0; j < size; ++j) first[j] += p[j];
      }
#pragma omp simd
      for (int64_t j = 0; j < size; ++j) ge[j] += first[j];
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> swiglu_backward(
    const at::Tensor& grad, const at::Tensor& x, const std::optional<at::Tensor>& token,
    const std::optional<at::Tensor>& weight, const at::Tensor& gate_up, const at::Tensor& down,
    const at::Tensor& gu, const at::Tensor& blocks_t, int64_t n_rows, int64_t n_slots,
    const std::optional<at::Tensor>& position, bool need_x, bool need_w, bool need_gate_up, bool need_down,
    bool parallel, const std::optional<at::Tensor>& shared_gate_up, const std::optional<at::Tensor>& shared_down,
    const std::optional<at::Tensor>& shared_gu, const std::optional<at::Tensor>& shared_blocks, int64_t shared_slots,
    bool need_shared_gate_up, bool need_shared_down) {
  check_inputs(x, token, weight, gate_up, down, n_rows);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.is_contiguous() && grad.scalar_type() == at::kFloat,
              "grad must be a contiguous float32 tensor shaped like x");
  const int64_t H = x.size(1);
  need_w = need_w && weight.has_value();
  std::vector<Set> sets{expert_set(token, weight, gate_up, down, blocks_t, n_rows, n_slots)};
  const bool shared = shared_gate_up || shared_down || shared_gu || shared_blocks;
  if (shared) {
    TORCH_CHECK(shared_gu, "the shared expert's backward needs its saved gate/up product shared_gu");
    sets.push_back(shared_set(x, position, shared_gate_up, shared_down, shared_blocks, shared_slots));
  }
  const at::Tensor* saved[2] = {&gu, shared ? &*shared_gu : nullptr};
  const bool need_gu[2] = {need_gate_up, shared && need_shared_gate_up};
  const bool need_dn[2] = {need_down, shared && need_shared_down};
  const int64_t slots[2] = {n_slots, shared_slots};
  const auto opts = x.options();
  if (position) check_positions(*position, n_rows);
  at::Tensor grad_x[2], grad_gate_up[2], grad_down[2];
  for (size_t s = 0; s < sets.size(); ++s) {
    const int64_t rows = s == 0 ? n_rows : x.size(0), I = sets[s].I;
    TORCH_CHECK(saved[s]->dim() == 2 && saved[s]->size(0) == rows && saved[s]->size(1) == 2 * I &&
                    saved[s]->is_contiguous() && saved[s]->scalar_type() == at::kFloat,
                "the saved gate/up product must be a contiguous float32 [N, 2I] tensor");
    // dx per row; with `position` summed per token before returning, so kept as in the forward
    grad_x[s] = !need_x ? at::empty({0}, opts) : position ? kept_rows(rows, H, static_cast<int>(s)) : pooled_empty({rows, H});
    grad_gate_up[s] = need_gu[s] ? pooled_empty({slots[s], 2 * I, H}) : at::empty({0}, opts);
    grad_down[s] = need_dn[s] ? pooled_empty({slots[s], H, I}) : at::empty({0}, opts);
  }
  at::Tensor grad_w = need_w ? pooled_empty({n_rows}) : at::empty({0}, opts);
  const auto jobs = jobs_of(sets);
  at::NoGradGuard no_grad;
  run_jobs(static_cast<int64_t>(jobs.size()), parallel, [&](int64_t j) {
    thread_local at::Tensor dys, xs, dh[2], dgu[2], wa[2];
    const int s = jobs[j].set;
    const Set& set = sets[s];
    const Block& b = *jobs[j].block;
    const int64_t n = b.stop - b.start, I = set.I;
    if (set.token) ensure_scratch(dys, set.most, H, opts);
    if (set.token && need_gu[s]) ensure_scratch(xs, set.most, H, opts);
    ensure_scratch(dh[s], set.most, I, opts);
    ensure_scratch(dgu[s], set.most, 2 * I, opts);
    ensure_scratch(wa[s], set.most, I, opts);
    const float* dy = rows_of(grad, set.token, b.start, n, dys);
    float *dhr = dh[s].data_ptr<float>(), *dgur = dgu[s].data_ptr<float>(), *war = wa[s].data_ptr<float>();
    const float* gate_up_e = set.gate_up + b.expert * 2 * I * H;
    const float* down_e = set.down + b.expert * H * I;
    gemm(dhr, I, n, I, H, {dy, H, 1}, {down_e, I, 1});
    act_backward(saved[s]->data_ptr<float>() + b.start * 2 * I, dhr, set.w ? set.w + b.start : nullptr, dgur, war,
                 s == 0 && need_w ? grad_w.data_ptr<float>() + b.start : nullptr, n, I);
    if (need_dn[s]) {  // d down_e = dy^T (w a)
      gemm(grad_down[s].data_ptr<float>() + b.slot * H * I, I, H, I, n, {dy, 1, H}, {war, I, 1});
    }
    if (need_x) {  // dx = [dg, du] gate_up_e
      gemm(grad_x[s].data_ptr<float>() + b.start * H, H, n, H, 2 * I, {dgur, 2 * I, 1}, {gate_up_e, H, 1});
    }
    if (need_gu[s]) {  // d gate_up_e = [dg, du]^T x
      const float* xr = rows_of(x, set.token, b.start, n, xs);
      gemm(grad_gate_up[s].data_ptr<float>() + b.slot * 2 * I * H, H, 2 * I, H, n, {dgur, 1, 2 * I}, {xr, H, 1});
    }
  });
  for (size_t s = 0; s < sets.size(); ++s) {  // per expert: split experts' partial sums added in
    const int64_t E = s == 0 ? gate_up.size(0) : 1;
    reduce_slots(grad_gate_up[s], sets[s].blocks, E);
    reduce_slots(grad_down[s], sets[s].blocks, E);
    if (grad_gate_up[s].numel()) grad_gate_up[s] = grad_gate_up[s].narrow(0, 0, E);
    if (grad_down[s].numel()) grad_down[s] = grad_down[s].narrow(0, 0, E);
  }
  at::Tensor dx = grad_x[0];
  if (need_x && position) dx = combine_rows(grad_x[0], *position, n_rows, shared ? grad_x[1].data_ptr<float>() : nullptr);
  const at::Tensor none = at::empty({0}, opts);
  return {dx, grad_w, grad_gate_up[0], grad_down[0], shared ? grad_gate_up[1] : none, shared ? grad_down[1] : none};
}

// The GEMMs of swiglu_forward (and with `backward`, of swiglu_backward too) alone, for a benchmark's
// bound: the same blocks, workers and BLAS calls with the same shapes and strides, on rows already
// sorted (x [N, H] read in place, no gathers), without the activation or the combine. The weight
// gradients go to full [slots, 2I, H] and [slots, H, I] buffers, as any implementation must write
// them, and are returned (empty without `backward`, so that a test can check the products); the
// other products stay in per-thread scratch. The layer's time over this one is what everything but
// its GEMMs and their required results costs.
std::tuple<at::Tensor, at::Tensor> gemm_bound(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down,
                                              const at::Tensor& blocks_t, bool backward, bool parallel) {
  check_inputs(x, std::nullopt, std::nullopt, gate_up, down, x.size(0));
  const int64_t H = x.size(1), I = down.size(2);
  const auto blocks = read_blocks(blocks_t);
  check_blocks(blocks, gate_up.size(0), x.size(0), 0);
  const int64_t most = max_rows(blocks);
  const auto opts = x.options();
  const float* xp = x.data_ptr<float>();
  const float* gate_up_w = gate_up.data_ptr<float>();
  const float* down_w = down.data_ptr<float>();
  int64_t n_slots = 1;
  for (const auto& b : blocks) n_slots = std::max(n_slots, b.slot + 1);
  at::Tensor grad_gate_up = backward ? pooled_empty({n_slots, 2 * I, H}) : at::empty({0}, opts);
  at::Tensor grad_down = backward ? pooled_empty({n_slots, H, I}) : at::empty({0}, opts);
  at::NoGradGuard no_grad;
  run_blocks(blocks, parallel, [&](const Block& b) {
    // gu holds x gate_up_e^T and stands in for [dg, du]; h (0.25 everywhere) for the activation and
    // w a; x for dy; out for the layer's rows and dx
    thread_local at::Tensor gu, h, out, dh;
    if (!h.defined() || h.size(0) < most || h.size(1) != I) h = at::full({most, I}, 0.25f, opts);
    ensure_scratch(gu, most, 2 * I, opts);
    ensure_scratch(out, most, H, opts);
    const int64_t n = b.stop - b.start;
    const float* xr = xp + b.start * H;
    const float* gate_up_e = gate_up_w + b.expert * 2 * I * H;
    const float* down_e = down_w + b.expert * H * I;
    float *gur = gu.data_ptr<float>(), *hr = h.data_ptr<float>();
    gemm(gur, 2 * I, n, 2 * I, H, {xr, H, 1}, {gate_up_e, 1, H});
    gemm(out.data_ptr<float>(), H, n, H, I, {hr, I, 1}, {down_e, 1, I});
    if (!backward) return;
    ensure_scratch(dh, most, I, opts);
    gemm(dh.data_ptr<float>(), I, n, I, H, {xr, H, 1}, {down_e, I, 1});
    gemm(grad_down.data_ptr<float>() + b.slot * H * I, I, H, I, n, {xr, 1, H}, {hr, I, 1});
    gemm(out.data_ptr<float>(), H, n, H, 2 * I, {gur, 2 * I, 1}, {gate_up_e, H, 1});
    gemm(grad_gate_up.data_ptr<float>() + b.slot * 2 * I * H, H, 2 * I, H, n, {gur, 1, 2 * I}, {xr, H, 1});
  });
  // per slot: d down = x^T h (0.25 times x's column sums), d gate_up = (x gate_up_e^T)^T x
  return {grad_gate_up, grad_down};
}

// the activation alone, for the grouped plan: h = w silu(g) u from gu [N, 2I]
at::Tensor swiglu_act(const at::Tensor& gu, const std::optional<at::Tensor>& weight) {
  TORCH_CHECK(gu.dim() == 2 && gu.size(1) % 2 == 0 && gu.is_contiguous() && gu.scalar_type() == at::kFloat,
              "gu must be a contiguous float32 [N, 2I] tensor");
  const int64_t n = gu.size(0), I = gu.size(1) / 2;
  if (weight) TORCH_CHECK(weight->numel() == n && weight->is_contiguous() && weight->scalar_type() == at::kFloat,
                          "weight must be a contiguous float32 [N] tensor");
  at::Tensor h = at::empty({n, I}, gu.options());
  const float* w = weight ? weight->data_ptr<float>() : nullptr;
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(I, 1)), [&](int64_t begin, int64_t end) {
    act_forward(gu.data_ptr<float>() + begin * 2 * I, h.data_ptr<float>() + begin * I, w ? w + begin : nullptr,
                end - begin, I);
  });
  return h;
}

// greater for top-k: NaN counts as the largest value (as torch.topk), ties keep the lower index
inline bool ranks_before(float a, float b) { return (std::isnan(a) && !std::isnan(b)) || a > b; }

// row's k largest values by insertion, largest first (torch.topk's order); any values
void topk_row_insert(const float* row, int64_t E, int64_t k, int64_t* ids, float* best) {
  int64_t filled = 0;
  for (int64_t e = 0; e < E; ++e) {
    const float x = row[e];
    if (filled == k && !ranks_before(x, best[k - 1])) continue;
    int64_t j = filled < k ? filled++ : k - 1;
    while (j > 0 && ranks_before(x, best[j - 1])) {
      best[j] = best[j - 1];
      ids[j] = ids[j - 1];
      --j;
    }
    best[j] = x;
    ids[j] = e;
  }
}

#if defined(__AVX2__)
// The same by k passes of max-then-find-first over a copy (work, E floats, E a multiple of 8) in which
// each pick is replaced by -inf, 8 lanes at a time: no data-dependent branch per element (the
// insertion above mispredicts at every insert; 4096 x 64 at k = 6: 1.46 -> 0.75 ms on one core).
// Returns false, for the insertion path, where a row has a NaN or a pick would be -inf (ties with
// the replaced picks).
bool topk_row_passes(const float* row, int64_t E, int64_t k, int64_t* ids, float* work) {
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 nan = _mm256_setzero_ps();
  for (int64_t e = 0; e < E; e += 8) {
    const __m256 x = _mm256_loadu_ps(row + e);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    _mm256_storeu_ps(work + e, x);
  }
  if (_mm256_movemask_ps(nan)) return false;
  for (int64_t j = 0; j < k; ++j) {
    __m256 m = _mm256_loadu_ps(work);
    for (int64_t e = 8; e < E; e += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(work + e));
    m = _mm256_max_ps(m, _mm256_permute2f128_ps(m, m, 1));  // the largest lane, in every lane
    m = _mm256_max_ps(m, _mm256_shuffle_ps(m, m, _MM_SHUFFLE(1, 0, 3, 2)));
    m = _mm256_max_ps(m, _mm256_shuffle_ps(m, m, _MM_SHUFFLE(2, 3, 0, 1)));
    if (_mm256_movemask_ps(_mm256_cmp_ps(m, neg_inf, _CMP_EQ_OQ))) return false;
    int64_t e = 0;
    for (;; e += 8) {  // the first lane equal to the largest: the lower index of a tie
      const int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(work + e), m, _CMP_EQ_OQ));
      if (mask) {
        e += __builtin_ctz(mask);
        break;
      }
    }
    ids[j] = e;
    work[e] = -std::numeric_limits<float>::infinity();
  }
  return true;
}
#else
bool topk_row_passes(const float*, int64_t, int64_t, int64_t*, float*) { return false; }
#endif

// indices [T, k] of each row's k largest values of choice [T, E], largest first (torch.topk's order)
at::Tensor topk_indices(const at::Tensor& choice, int64_t k) {
  TORCH_CHECK(choice.dim() == 2 && choice.scalar_type() == at::kFloat, "choice must be a float32 [T, E] tensor");
  TORCH_CHECK(k >= 1 && k <= choice.size(1), "k must be in [1, E]");
  const at::Tensor c = choice.contiguous();
  const int64_t T = c.size(0), E = c.size(1);
  at::Tensor out = at::empty({T, k}, c.options().dtype(at::kLong));
  const float* v = c.data_ptr<float>();
  int64_t* idx = out.data_ptr<int64_t>();
  // passes cost about k * E / 8 vector steps a row, the insertion about E branches: passes for small k
  const bool passes = E % 8 == 0 && k * 4 <= E;
  at::parallel_for(0, T, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> work(std::max(E, k));
    for (int64_t t = begin; t < end; ++t) {
      const float* row = v + t * E;
      int64_t* ids = idx + t * k;
      if (!passes || !topk_row_passes(row, E, k, ids, work.data())) topk_row_insert(row, E, k, ids, work.data());
    }
  });
  return out;
}

// The T*K (token, expert) pairs sorted by expert, stably (a counting sort), pairs with index -1
// (dropped by capacity) left out: (order [N] of flat pair ids, token [N], counts [E],
// position [T, K]: where each pair landed, N for a dropped pair)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sort_pairs(const at::Tensor& indices, int64_t E) {
  TORCH_CHECK(indices.dim() == 2 && indices.scalar_type() == at::kLong, "indices must be an int64 [T, K] tensor");
  const at::Tensor ind = indices.contiguous();
  const int64_t K = ind.size(1), P = ind.numel();
  const int64_t* flat = ind.data_ptr<int64_t>();
  at::Tensor counts = at::zeros({E}, ind.options());
  int64_t* cnt = counts.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p) {
    const int64_t e = flat[p];
    TORCH_CHECK(e >= -1 && e < E, "expert index ", e, " out of range [-1, ", E, ")");
    if (e >= 0) ++cnt[e];
  }
  std::vector<int64_t> next(E);
  int64_t n = 0;
  for (int64_t e = 0; e < E; ++e) {
    next[e] = n;
    n += cnt[e];
  }
  at::Tensor order = at::empty({n}, ind.options()), token = at::empty({n}, ind.options());
  at::Tensor position = at::empty({ind.size(0), K}, ind.options());
  int64_t *o = order.data_ptr<int64_t>(), *tk = token.data_ptr<int64_t>(), *pos = position.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p) {
    const int64_t e = flat[p];
    if (e < 0) {
      pos[p] = n;
      continue;
    }
    const int64_t slot = next[e]++;
    o[slot] = p;
    tk[slot] = p / K;
    pos[p] = slot;
  }
  return {order, token, counts, position};
}

// switches the direct BLAS calls of `gemm` on or off (off: at::mm_out, for tests); returns the old state
bool direct_blas(bool on) { return direct_blas_on.exchange(on); }

}  // namespace

TORCH_LIBRARY(moe_lib_cpu, m) {
  m.def("swiglu_forward(Tensor x, Tensor? token, Tensor? weight, Tensor gate_up, Tensor down, Tensor blocks, "
        "int n_rows, Tensor? position, bool save, bool parallel, Tensor? shared_gate_up=None, "
        "Tensor? shared_down=None, Tensor? shared_blocks=None) -> (Tensor, Tensor, Tensor)",
        &swiglu_forward);
  m.def("swiglu_backward(Tensor grad, Tensor x, Tensor? token, Tensor? weight, Tensor gate_up, Tensor down, "
        "Tensor gu, Tensor blocks, int n_rows, int n_slots, Tensor? position, bool need_x, bool need_w, "
        "bool need_gate_up, bool need_down, bool parallel, Tensor? shared_gate_up=None, Tensor? shared_down=None, "
        "Tensor? shared_gu=None, Tensor? shared_blocks=None, int shared_slots=0, bool need_shared_gate_up=False, "
        "bool need_shared_down=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
        &swiglu_backward);
  m.def("swiglu_act(Tensor gu, Tensor? weight) -> Tensor", &swiglu_act);
  m.def("gemm_bound(Tensor x, Tensor gate_up, Tensor down, Tensor blocks, bool backward, bool parallel) -> "
        "(Tensor, Tensor)",
        &gemm_bound);
  m.def("topk_indices(Tensor choice, int k) -> Tensor", &topk_indices);
  m.def("direct_blas(bool on) -> bool", &direct_blas);
  m.def("pool_trim() -> int", &pool_trim);
  m.def("pool_cached() -> int", &pool_cached);
  m.def("sort_pairs(Tensor indices, int n_experts) -> (Tensor, Tensor, Tensor, Tensor)", &sort_pairs);
}
