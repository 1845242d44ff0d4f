// Block-sparse causal attention on the CPU, forward and backward, flash-style: see ../cpp.py.
//
// Work comes in tiles: a few query blocks of one head (any blocks, copied side by side where more than one) and
// the union of the key blocks they read, ascending, each with a bit per query block that sees it; tiles are visited
// in an order that keeps the key blocks successive tiles share in cache (cpp.py). A tile's keys are taken a
// chunk at a time; within a chunk, key blocks adjacent in memory form one run, one GEMM. The scores of a chunk
// are masked at block level (bits) and causally in a query block's own key block, then folded into the
// running max, sum and output (online softmax). The backward recomputes the probabilities from the saved
// log-sum-exp. GEMMs are the BLAS sgemm that torch links (MKL on x86 builds).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
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

// A (B, H, N, D) fp32 tensor whose rows of D are contiguous, at any other strides: the heads of a fused qkv
// projection's output (B, N, 3, H, D) are read where they lie, and outputs are written as (B, N, H, D), so the
// projections on either side need no copy.
struct View {
  float* p;
  int64_t sb, sh, sn;
  float* row(int64_t b, int64_t h, int64_t n) const { return p + b * sb + h * sh + n * sn; }
};

View view_of(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4 && t.scalar_type() == at::kFloat && t.device().is_cpu(), name, ": a (B, H, N, D) fp32 CPU tensor");
  TORCH_CHECK(t.stride(3) == 1 || t.size(3) == 1, name, ": rows of D must be contiguous");
  return {t.data_ptr<float>(), t.stride(0), t.stride(1), t.stride(2)};
}

// Rows [n0, n0 + count) of head h, batch b, side by side in dst (count x D).
void gather_rows(float* dst, const View& x, int64_t b, int64_t h, int64_t n0, int count, int D) {
  for (int a = 0; a < count; ++a) std::memcpy(dst + static_cast<int64_t>(a) * D, x.row(b, h, n0 + a), sizeof(float) * D);
}

// q, k, v: (B, H, N, D) views. Writes out (a view of the same shape) and lse (B, H * N, contiguous).
void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
             const at::Tensor& rows_ptr, const at::Tensor& rows, const at::Tensor& keys_ptr, const at::Tensor& keys,
             const at::Tensor& seen, const at::Tensor& order, int64_t block_size, double scale_) {
  const Tiles tl = tiles_of(rows_ptr, rows, keys_ptr, keys, seen, order);
  const View Q = view_of(q, "q"), K = view_of(k, "k"), V = view_of(v, "v"), O = view_of(out, "out");
  TORCH_CHECK(lse.is_contiguous() && lse.scalar_type() == at::kFloat, "lse: contiguous fp32");
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  const int bs = static_cast<int>(block_size), Dn = static_cast<int>(D);
  const int64_t R = N / bs;
  const float scale = static_cast<float>(scale_);
  const int ldq = static_cast<int>(Q.sn), ldk = static_cast<int>(K.sn), ldv = static_cast<int>(V.sn);
  float* lp = lse.data_ptr<float>();
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
      const int64_t h = rows_t[0] / R;
      const float* qt = Q.row(b, h, rows_t[0] % R * bs);
      int ld = ldq;
      if (G > 1) {  // the tile's query blocks side by side
        qbuf.resize(static_cast<size_t>(M) * D);
        for (int i = 0; i < G; ++i) gather_rows(qbuf.data() + static_cast<int64_t>(i) * bs * D, Q, b, h, rows_t[i] % R * bs, bs, Dn);
        qt = qbuf.data();
        ld = Dn;
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
          mm(false, true, M, len * bs, Dn, scale, qt, ld, K.row(b, h, tl.keys[k0 + j] % R * bs), ldk, 0.0f, s + j * bs, n);
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
          mm(false, false, M, Dn, len * bs, 1.0f, s + j * bs, n, V.row(b, h, tl.keys[k0 + j] % R * bs), ldv, 1.0f, obuf.data(), Dn);
      }
      for (int i = 0; i < G; ++i) {
        const int64_t first = rows_t[i] % R * bs;
        for (int a = 0; a < bs; ++a) {
          const int r = i * bs + a;
          const float inv = 1.0f / sum[r];
          float* o = O.row(b, h, first + a);
          const float* src = obuf.data() + static_cast<int64_t>(r) * D;
#pragma omp simd
          for (int d = 0; d < Dn; ++d) o[d] = src[d] * inv;
          lp[(b * H + h) * N + first + a] = mx[r] + std::log(sum[r]);
        }
      }
    }
  }
}

// Gradients of q, k, v, written into dq, dk, dv (views like q's), given the upstream gradient, the output and its
// log-sum-exp. One task per (batch, head), so a head's key gradients have one writer; tiles must come grouped by
// head (head_ptr: (H + 1) into the tiles).
void backward(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
              const at::Tensor& lse, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
              const at::Tensor& rows_ptr, const at::Tensor& rows, const at::Tensor& keys_ptr, const at::Tensor& keys,
              const at::Tensor& seen, const at::Tensor& order, const at::Tensor& head_ptr, int64_t block_size, double scale_) {
  const Tiles tl = tiles_of(rows_ptr, rows, keys_ptr, keys, seen, order);
  TORCH_CHECK(head_ptr.scalar_type() == at::kInt && head_ptr.is_contiguous());
  TORCH_CHECK(lse.is_contiguous() && lse.scalar_type() == at::kFloat, "lse: contiguous fp32");
  const View G_ = view_of(grad, "grad"), Q = view_of(q, "q"), K = view_of(k, "k"), V = view_of(v, "v"), O = view_of(out, "out");
  const View dQ = view_of(dq, "dq"), dK = view_of(dk, "dk"), dV = view_of(dv, "dv");
  const int32_t* hp = head_ptr.data_ptr<int32_t>();
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  TORCH_CHECK(head_ptr.numel() - 1 == H, "head_ptr: one entry per head and one more");
  const int bs = static_cast<int>(block_size), Dn = static_cast<int>(D);
  const int64_t R = N / bs;
  const float scale = static_cast<float>(scale_);
  const int ldk = static_cast<int>(K.sn), ldv = static_cast<int>(V.sn), lddk = static_cast<int>(dK.sn), lddv = static_cast<int>(dV.sn);
  const float* lp = lse.data_ptr<float>();
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
      // Not zeroed in a pass of its own (under load, its barrier cost a fourth of a light layout's time): a query
      // block's gradient comes from its one tile and is stored; a head's key gradients are zeroed by its task.
      for (int64_t n = 0; n < N; ++n) {
        std::fill(dK.row(b, h, n), dK.row(b, h, n) + D, 0.0f);
        std::fill(dV.row(b, h, n), dV.row(b, h, n) + D, 0.0f);
      }
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
          const int64_t first = rows_t[i] % R * bs;
          gather_rows(qbuf.data() + static_cast<int64_t>(i) * bs * D, Q, b, h, first, bs, Dn);
          gather_rows(gbuf.data() + static_cast<int64_t>(i) * bs * D, G_, b, h, first, bs, Dn);
          for (int a = 0; a < bs; ++a) {
            const float* o = O.row(b, h, first + a);
            const float* g = G_.row(b, h, first + a);
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int d = 0; d < Dn; ++d) dot += o[d] * g[d];
            dbuf[i * bs + a] = dot;  // D_i = rowsum(dO * O)
            lbuf[i * bs + a] = lp[(b * H + h) * N + first + a];
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
            const int64_t at = tl.keys[k0 + j] % R * bs;
            mm(false, true, M, len * bs, Dn, scale, qbuf.data(), Dn, K.row(b, h, at), ldk, 0.0f, s + j * bs, n);
            mm(false, true, M, len * bs, Dn, 1.0f, gbuf.data(), Dn, V.row(b, h, at), ldv, 0.0f, dp + j * bs, n);
          }
          mask_chunk(s, n, tl, t, k0, k1, bs);
          for (int a = 0; a < M; ++a) {
            float* srow = s + static_cast<int64_t>(a) * n;  // becomes P
            float* drow = dp + static_cast<int64_t>(a) * n;  // becomes dS = P * (dP - D_i)
            probs_and_dscores(srow, drow, n, lbuf[a], dbuf[a]);
          }
          for (auto [j, len] : runs) {
            const int64_t at = tl.keys[k0 + j] % R * bs;
            const int nk = len * bs;
            mm(true, false, nk, Dn, M, 1.0f, s + j * bs, n, gbuf.data(), Dn, 1.0f, dV.row(b, h, at), lddv);
            mm(true, false, nk, Dn, M, scale, dp + j * bs, n, qbuf.data(), Dn, 1.0f, dK.row(b, h, at), lddk);
            mm(false, false, M, Dn, nk, scale, dp + j * bs, n, K.row(b, h, at), ldk, 1.0f, dqbuf.data(), Dn);
          }
        }
        for (int i = 0; i < G; ++i)
          for (int a = 0; a < bs; ++a)
            std::memcpy(dQ.row(b, h, rows_t[i] % R * bs + a), dqbuf.data() + (static_cast<int64_t>(i) * bs + a) * D,
                        sizeof(float) * D);
      }
    }
  }
}

}  // namespace

TORCH_LIBRARY(sparse_transformer_cpp, m) {
  m.def("forward(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor(b!) lse, Tensor rows_ptr, Tensor rows, "
        "Tensor keys_ptr, Tensor keys, Tensor seen, Tensor order, int block_size, float scale) -> ()");
  m.def("backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor(a!) dq, Tensor(b!) dk, "
        "Tensor(c!) dv, Tensor rows_ptr, Tensor rows, Tensor keys_ptr, Tensor keys, Tensor seen, Tensor order, "
        "Tensor head_ptr, int block_size, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(sparse_transformer_cpp, CPU, m) {
  m.impl("forward", &forward);
  m.impl("backward", &backward);
}
