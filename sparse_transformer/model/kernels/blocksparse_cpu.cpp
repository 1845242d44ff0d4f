// Block-sparse causal attention on the CPU, forward and backward, flash-style: see ../cpp.py.
//
// Work comes in tiles: a few query blocks of one head (any blocks, copied side by side) and the union of the
// key blocks they read, ascending, each with a bit per query block that sees it; tiles are visited in an order
// that keeps the key blocks successive tiles share in cache (cpp.py). A tile's keys are taken a
// chunk at a time; within a chunk, key blocks adjacent in memory form one run, one GEMM. The scores of a chunk
// are masked at block level (bits) and causally in a query block's own key block, then folded into the
// running max, sum and output (online softmax). The backward recomputes the probabilities from the saved
// log-sum-exp. GEMMs are the BLAS sgemm that torch links (MKL on x86 builds).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// Row-major C (m x n, ldc) = alpha * op(A) (m x k) * op(B) (k x n) + beta * C; op(X) = X^T where t* is set.
// BLAS is column-major, so it computes C^T = op(B)^T op(A)^T.
inline void mm(bool ta, bool tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb,
               float beta, float* c, int ldc) {
  const char na = ta ? 'T' : 'N', nb = tb ? 'T' : 'N';
  sgemm_(&nb, &na, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}

// exp(x) for x <= 0 (scores minus their max): 2^i * 2^f, 2^f by its Taylor series to f^6 (|f| <= 1/2,
// relative error < 2e-7); below -87 (and -inf) it is 0. Written so that the compiler vectorises the loops using
// it (std::nearbyint and a memcpy to make 2^i do; std::floor or a bit_cast stop GCC 12).
inline float exp_nonpositive(float x) {
  const float t = std::max(x, -87.0f) * 1.44269504088896341f;
  const float i = std::nearbyint(t);
  const float f = (t - i) * 0.693147180559945309f;
  float p = 1.0f / 720;
  p = p * f + 1.0f / 120;
  p = p * f + 1.0f / 24;
  p = p * f + 1.0f / 6;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(i) + 127) << 23;
  float two_i;
  std::memcpy(&two_i, &bits, sizeof(two_i));
  return x < -87.0f ? 0.0f : p * two_i;
}

// A row of scores becomes probabilities exp(s - lse), and the row of dP beside it dS = P * (dP - D_i).
void probs_and_dscores(float* __restrict s, float* __restrict dp, int n, float lse, float di) {
  for (int c = 0; c < n; ++c) {
    const float p = exp_nonpositive(s[c] - lse);
    s[c] = p;
    dp[c] = p * (dp[c] - di);
  }
}

struct Tiles {
  const int32_t* rows_ptr;  // (T + 1): tile t's query blocks are rows[rows_ptr[t] .. rows_ptr[t + 1])
  const int32_t* rows;      // flat query block h * R + r
  const int32_t* keys_ptr;  // (T + 1)
  const int32_t* keys;      // flat key block, ascending within a tile
  const int32_t* seen;      // bit i: the tile's i-th query block reads this key block
  const int32_t* order;     // (T): the tiles in the order to visit them, head by head
  int64_t count;
};

Tiles tiles_of(const at::Tensor& rows_ptr, const at::Tensor& rows, const at::Tensor& keys_ptr, const at::Tensor& keys,
               const at::Tensor& seen, const at::Tensor& order) {
  for (const auto* t : {&rows_ptr, &rows, &keys_ptr, &keys, &seen, &order}) {
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous() && t->device().is_cpu(), "tile tables: int32 CPU");
  }
  TORCH_CHECK(order.numel() == rows_ptr.numel() - 1, "tile order: one entry per tile");
  return {rows_ptr.data_ptr<int32_t>(), rows.data_ptr<int32_t>(), keys_ptr.data_ptr<int32_t>(),
          keys.data_ptr<int32_t>(), seen.data_ptr<int32_t>(), order.data_ptr<int32_t>(), rows_ptr.numel() - 1};
}

// Key blocks [k0, k1) of a tile as runs of blocks adjacent in memory: (first block index in the list, length).
void runs_of(const int32_t* keys, int k0, int k1, std::vector<std::pair<int, int>>& out) {
  out.clear();
  for (int j = k0; j < k1;) {
    int e = j + 1;
    while (e < k1 && keys[e] == keys[e - 1] + 1) ++e;
    out.emplace_back(j - k0, e - j);
    j = e;
  }
}

// -inf where a query of the tile must not see a key of the chunk: blocks whose bit is clear, and keys after the
// query in the query's own block.
void mask_chunk(float* s, int ld, const Tiles& tl, int64_t t, int k0, int k1, int bs) {
  const int32_t* rows = tl.rows + tl.rows_ptr[t];
  const int G = tl.rows_ptr[t + 1] - tl.rows_ptr[t];
  for (int j = k0; j < k1; ++j) {
    const int32_t key = tl.keys[j], bits = tl.seen[j];
    float* col = s + (j - k0) * bs;
    for (int i = 0; i < G; ++i) {
      float* block = col + static_cast<int64_t>(i) * bs * ld;
      if (!((bits >> i) & 1)) {
        for (int a = 0; a < bs; ++a) std::fill(block + a * ld, block + a * ld + bs, NEG_INF);
      } else if (key == rows[i]) {
        for (int a = 0; a < bs; ++a) std::fill(block + a * ld + a + 1, block + a * ld + bs, NEG_INF);
      }
    }
  }
}

constexpr int CHUNK_KEYS = 512;  // keys per chunk of a tile (whole blocks, at least one)

int chunk_blocks(int bs) { return std::max(1, CHUNK_KEYS / bs); }

// q, k, v: (B, H*R*bs, D) contiguous fp32. Returns out (same) and lse (B, H*R*bs).
std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rows_ptr,
                                const at::Tensor& rows, const at::Tensor& keys_ptr, const at::Tensor& keys,
                                const at::Tensor& seen, const at::Tensor& order, int64_t block_size, double scale_) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.is_contiguous() && k.is_contiguous() && v.is_contiguous());
  const Tiles tl = tiles_of(rows_ptr, rows, keys_ptr, keys, seen, order);
  const int64_t B = q.size(0), L = q.size(1), D = q.size(2);
  const int bs = static_cast<int>(block_size), Dn = static_cast<int>(D);
  const float scale = static_cast<float>(scale_);
  auto out = at::empty_like(q);
  auto lse = at::empty({B, L}, q.options());
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float *op = out.data_ptr<float>(), *lp = lse.data_ptr<float>();
  const int per_chunk = chunk_blocks(bs);
  const int64_t tasks = B * tl.count;  // in the tiles' order: successive tiles read many of the same key blocks

#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> qbuf, obuf, sbuf, mx, sum;
    std::vector<std::pair<int, int>> runs;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / tl.count, t = tl.order[task % tl.count];
      const int32_t* rows_t = tl.rows + tl.rows_ptr[t];
      const int G = tl.rows_ptr[t + 1] - tl.rows_ptr[t], M = G * bs;
      const float* qb = qp + b * L * D;
      const float* kb = kp + b * L * D;
      const float* vb = vp + b * L * D;
      const float* qt = qb + static_cast<int64_t>(rows_t[0]) * bs * D;
      if (G > 1) {
        qbuf.resize(static_cast<size_t>(M) * D);
        for (int i = 0; i < G; ++i)
          std::memcpy(qbuf.data() + static_cast<int64_t>(i) * bs * D, qb + static_cast<int64_t>(rows_t[i]) * bs * D,
                      sizeof(float) * bs * D);
        qt = qbuf.data();
      }
      obuf.assign(static_cast<size_t>(M) * D, 0.0f);
      mx.assign(M, NEG_INF);
      sum.assign(M, 0.0f);
      const int kfirst = tl.keys_ptr[t], klast = tl.keys_ptr[t + 1];
      for (int k0 = kfirst; k0 < klast; k0 += per_chunk) {
        const int k1 = std::min(klast, k0 + per_chunk), n = (k1 - k0) * bs;
        sbuf.resize(static_cast<size_t>(M) * n);
        float* s = sbuf.data();
        runs_of(tl.keys, k0, k1, runs);
        for (auto [j, len] : runs)
          mm(false, true, M, len * bs, Dn, scale, qt, Dn, kb + static_cast<int64_t>(tl.keys[k0 + j]) * bs * D, Dn, 0.0f,
             s + j * bs, n);
        mask_chunk(s, n, tl, t, k0, k1, bs);
        for (int a = 0; a < M; ++a) {
          float* row = s + static_cast<int64_t>(a) * n;
          float m = mx[a];
#pragma omp simd reduction(max : m)
          for (int c = 0; c < n; ++c) m = std::max(m, row[c]);
          if (m == NEG_INF) {  // nothing seen yet
            std::fill(row, row + n, 0.0f);
            continue;
          }
          const float rescale = exp_nonpositive(mx[a] - m);
          float add = 0.0f;
#pragma omp simd reduction(+ : add)
          for (int c = 0; c < n; ++c) {
            row[c] = exp_nonpositive(row[c] - m);
            add += row[c];
          }
          sum[a] = sum[a] * rescale + add;
          mx[a] = m;
          if (rescale != 1.0f) {
            float* o = obuf.data() + static_cast<int64_t>(a) * D;
#pragma omp simd
            for (int d = 0; d < Dn; ++d) o[d] *= rescale;
          }
        }
        for (auto [j, len] : runs)
          mm(false, false, M, Dn, len * bs, 1.0f, s + j * bs, n, vb + static_cast<int64_t>(tl.keys[k0 + j]) * bs * D, Dn,
             1.0f, obuf.data(), Dn);
      }
      for (int i = 0; i < G; ++i) {
        const int64_t first = static_cast<int64_t>(rows_t[i]) * bs;
        for (int a = 0; a < bs; ++a) {
          const int r = i * bs + a;
          const float inv = 1.0f / sum[r];
          float* o = op + (b * L + first + a) * D;
          const float* src = obuf.data() + static_cast<int64_t>(r) * D;
#pragma omp simd
          for (int d = 0; d < Dn; ++d) o[d] = src[d] * inv;
          lp[b * L + first + a] = mx[r] + std::log(sum[r]);
        }
      }
    }
  }
  return {out, lse};
}

// Gradients of q, k, v given the upstream gradient, the output and its log-sum-exp. One task per (batch, head),
// so a head's key gradients have one writer; tiles must come grouped by head (head_ptr: (H + 1) into the tiles).
std::vector<at::Tensor> backward(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& out, const at::Tensor& lse, const at::Tensor& rows_ptr,
                                 const at::Tensor& rows, const at::Tensor& keys_ptr, const at::Tensor& keys,
                                 const at::Tensor& seen, const at::Tensor& order, const at::Tensor& head_ptr,
                                 int64_t block_size, double scale_) {
  TORCH_CHECK(grad.scalar_type() == at::kFloat && grad.is_contiguous() && out.is_contiguous() && lse.is_contiguous());
  const Tiles tl = tiles_of(rows_ptr, rows, keys_ptr, keys, seen, order);
  TORCH_CHECK(head_ptr.scalar_type() == at::kInt && head_ptr.is_contiguous());
  const int32_t* hp = head_ptr.data_ptr<int32_t>();
  const int64_t H = head_ptr.numel() - 1;
  const int64_t B = q.size(0), L = q.size(1), D = q.size(2);
  const int bs = static_cast<int>(block_size), Dn = static_cast<int>(D);
  const float scale = static_cast<float>(scale_);
  // Not zeroed here, in a pass of its own (under load, its barrier cost a fourth of a light layout's time): a
  // query block's gradient comes from its one tile and is stored; a head's key gradients are zeroed by its task.
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  const float *gp = grad.data_ptr<float>(), *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(),
              *vp = v.data_ptr<float>(), *op = out.data_ptr<float>(), *lp = lse.data_ptr<float>();
  float *dqp = dq.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
  const int per_chunk = chunk_blocks(bs);
  // Heads in order of their work, the largest first, so the last ones to finish are short (heads differ: split
  // and interleaved patterns give half the heads another rule).
  std::vector<int64_t> work(H, 0), heads(B * H);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t t = hp[h]; t < hp[h + 1]; ++t)
      work[h] += static_cast<int64_t>(tl.rows_ptr[t + 1] - tl.rows_ptr[t]) * (tl.keys_ptr[t + 1] - tl.keys_ptr[t]);
  for (int64_t i = 0; i < B * H; ++i) heads[i] = i;
  std::stable_sort(heads.begin(), heads.end(), [&](int64_t a, int64_t c) { return work[a % H] > work[c % H]; });

#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> qbuf, gbuf, dqbuf, sbuf, pbuf, lbuf, dbuf;
    std::vector<std::pair<int, int>> runs;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < B * H; ++i) {
      const int64_t b = heads[i] / H, h = heads[i] % H;
      const int64_t base = b * L * D, head = L / H * D;
      std::fill(dkp + base + h * head, dkp + base + (h + 1) * head, 0.0f);
      std::fill(dvp + base + h * head, dvp + base + (h + 1) * head, 0.0f);
      for (int64_t visit = hp[h]; visit < hp[h + 1]; ++visit) {
        const int64_t t = tl.order[visit];
        const int32_t* rows_t = tl.rows + tl.rows_ptr[t];
        const int G = tl.rows_ptr[t + 1] - tl.rows_ptr[t], M = G * bs;
        qbuf.resize(static_cast<size_t>(M) * D);
        gbuf.resize(static_cast<size_t>(M) * D);
        dqbuf.assign(static_cast<size_t>(M) * D, 0.0f);
        lbuf.resize(M);
        dbuf.resize(M);
        for (int i = 0; i < G; ++i) {
          const int64_t first = static_cast<int64_t>(rows_t[i]) * bs;
          std::memcpy(qbuf.data() + static_cast<int64_t>(i) * bs * D, qp + base + first * D, sizeof(float) * bs * D);
          std::memcpy(gbuf.data() + static_cast<int64_t>(i) * bs * D, gp + base + first * D, sizeof(float) * bs * D);
          for (int a = 0; a < bs; ++a) {
            const float* o = op + base + (first + a) * D;
            const float* g = gp + base + (first + a) * D;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int d = 0; d < Dn; ++d) dot += o[d] * g[d];
            dbuf[i * bs + a] = dot;  // D_i = rowsum(dO * O)
            lbuf[i * bs + a] = lp[b * L + first + a];
          }
        }
        const int kfirst = tl.keys_ptr[t], klast = tl.keys_ptr[t + 1];
        for (int k0 = kfirst; k0 < klast; k0 += per_chunk) {
          const int k1 = std::min(klast, k0 + per_chunk), n = (k1 - k0) * bs;
          sbuf.resize(static_cast<size_t>(M) * n);
          pbuf.resize(static_cast<size_t>(M) * n);
          float *s = sbuf.data(), *dp = pbuf.data();
          runs_of(tl.keys, k0, k1, runs);
          for (auto [j, len] : runs) {
            const int64_t at = static_cast<int64_t>(tl.keys[k0 + j]) * bs * D;
            mm(false, true, M, len * bs, Dn, scale, qbuf.data(), Dn, kp + base + at, Dn, 0.0f, s + j * bs, n);
            mm(false, true, M, len * bs, Dn, 1.0f, gbuf.data(), Dn, vp + base + at, Dn, 0.0f, dp + j * bs, n);
          }
          mask_chunk(s, n, tl, t, k0, k1, bs);
          for (int a = 0; a < M; ++a) {
            float* srow = s + static_cast<int64_t>(a) * n;  // becomes P
            float* drow = dp + static_cast<int64_t>(a) * n;  // becomes dS = P * (dP - D_i)
            probs_and_dscores(srow, drow, n, lbuf[a], dbuf[a]);
          }
          for (auto [j, len] : runs) {
            const int64_t at = static_cast<int64_t>(tl.keys[k0 + j]) * bs * D;
            const int nk = len * bs;
            mm(true, false, nk, Dn, M, 1.0f, s + j * bs, n, gbuf.data(), Dn, 1.0f, dvp + base + at, Dn);
            mm(true, false, nk, Dn, M, scale, dp + j * bs, n, qbuf.data(), Dn, 1.0f, dkp + base + at, Dn);
            mm(false, false, M, Dn, nk, scale, dp + j * bs, n, kp + base + at, Dn, 1.0f, dqbuf.data(), Dn);
          }
        }
        for (int i = 0; i < G; ++i)
          std::memcpy(dqp + base + static_cast<int64_t>(rows_t[i]) * bs * D, dqbuf.data() + static_cast<int64_t>(i) * bs * D,
                      sizeof(float) * bs * D);
      }
    }
  }
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY(sparse_transformer_cpp, m) {
  m.def("forward(Tensor q, Tensor k, Tensor v, Tensor rows_ptr, Tensor rows, Tensor keys_ptr, Tensor keys, "
        "Tensor seen, Tensor order, int block_size, float scale) -> Tensor[]");
  m.def("backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor rows_ptr, Tensor rows, "
        "Tensor keys_ptr, Tensor keys, Tensor seen, Tensor order, Tensor head_ptr, int block_size, float scale) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(sparse_transformer_cpp, CPU, m) {
  m.impl("forward", &forward);
  m.impl("backward", &backward);
}
