// Cross-attention over the encoder output E with the key/value projections absorbed (model/absorbed.py):
// z[b, h] = softmax(Q'[b, h] · E[b]ᵀ) · E[b] for the H heads of slot b, reading E once for both products.
//
// One block per (slot, split of the keys), WARPS warps. The model width D is split over the warps (DW = D / WARPS
// dims each), so each warp holds only its slice of the output accumulator, Zᵀ [DW, HP] in float32, and its slice
// of Q' as MMA fragments; the only exchange between warps is each block of keys' partial scores. Per block of BK
// keys, staged in shared memory by cp.async (two stages; each warp copies and waits for its own slice):
//   1. each warp: partial Sᵀ [BK keys, HP heads] = E[keys, its dims] · Q'ᵀ[its dims, heads]  (mma m16n8k16);
//   2. the partials summed in shared memory; per head an online softmax over the block (a warp per head, a lane
//      per key), P [HP, BK] in fp16 and each head's rescale factor;
//   3. each warp: Zᵀ[its dims, heads] = Zᵀ·alpha + Eᵀ[its dims, keys] · Pᵀ[keys, heads]  (ldmatrix.trans of E).
// Heads are the N of every MMA (20 heads: three n8 tiles, HP = 24, the last 4 zero).
//
// With SPLITS > 1 the blocks of a slot write unnormalised sums and their softmax state, and absorbed_merge (a block
// per slot and head) combines them.
//
// -D defines: D (model width), HEADS, WARPS, BK (32: a lane per key), SPLITS. fp16 only. No CUDA headers
// (compiled by NVRTC without a toolkit: model/cuda_rtc.py). Measured on an H100 (bench/gpu_absorbed_cross.py):
// a large-v3 layer at 64 slots 128 µs against SDPA's 161 over K and V, at 256 slots 372 against 622.

typedef unsigned short u16;
typedef unsigned int u32;

#define HP 24
#define NT (HP / 8)
#define DW (D / WARPS)
#define KS (DW / 16)
#define MT (DW / 16)
#define ROW (D + 8)  // a tile row in halves: 16 B of padding keep ldmatrix's eight rows on distinct banks
#define PROW 40      // a P row in halves (80 B: the fragment loads' eight rows on distinct banks)
#define RROW 36      // a partial-score row (one warp, one head) in floats: writes and reads on distinct banks
// benchmark switches (bench/gpu_absorbed_cross.py), the defaults the fastest measured
#ifndef PREFETCH
#define PREFETCH 2   // 1: each warp's slice of block i + 2 prefetched into L2 (bulk); 2: cp.async with L2::256B; 3: both
#endif
#ifndef ABLATE
#define ABLATE 0     // timing only (wrong results): 1 no score MMAs, 2 no softmax, 4 no output MMAs, 8 no loads
#endif
#define THREADS (WARPS * 32)
#define NEG_INF (-__int_as_float(0x7f800000))

static_assert(D % (WARPS * 16) == 0, "each warp's dims must be whole 16-wide steps");
static_assert(BK == 32, "a lane per key of a block");
static_assert(HEADS <= HP, "at most 24 heads");

__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }

__device__ __forceinline__ u16 f2h(float f) {
  u16 r;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
  return r;
}

__device__ __forceinline__ void mma(float* c, const u32* a, const u32* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void ldmatrix_x4(u32* a, const u16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(u32* a, const u16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// this warp's slice (dims dw0 .. dw0 + DW) of keys [k0, k0 + BK) of slot e (rows past `end` zero-filled) into a
// tile [BK][ROW], as one cp.async group: only this warp reads it, so a warp waits for its own copies alone
__device__ __forceinline__ void load_slice(u16* tile, const u16* e, long long sen, int dw0, long long k0,
                                           long long end) {
  const int lane = threadIdx.x & 31;
  for (int c = lane; c < BK * (DW / 8); c += 32) {
    const int row = c / (DW / 8), col = dw0 + (c % (DW / 8)) * 8;
    const bool ok = k0 + row < end;
    const u16* src = ok ? e + (k0 + row) * sen + col : e;
    if (PREFETCH & 2)
      asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;" ::"r"(smem_addr(tile + row * ROW + col)),
                   "l"(src), "r"(ok ? 16 : 0)
                   : "memory");
    else
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(tile + row * ROW + col)),
                   "l"(src), "r"(ok ? 16 : 0)
                   : "memory");
  }
}

// this warp's slice of keys [k0, k0 + BK) into L2, a row a lane (a bulk prefetch: no registers, no shared memory)
__device__ __forceinline__ void prefetch_slice(const u16* e, long long sen, int dw0, long long k0, long long end) {
  const int lane = threadIdx.x & 31;
  if (lane < BK && k0 + lane < end)
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(e + (k0 + lane) * sen + dw0), "r"(DW * 2)
                 : "memory");
}

__device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

extern "C" __global__ void __launch_bounds__(THREADS, 1)
    absorbed_cross(const u16* __restrict__ q, const u16* __restrict__ e, u16* __restrict__ z, float* __restrict__ ws,
                   float* __restrict__ stat, long long n_keys, long long sqb, long long sqh, long long seb,
                   long long sen, long long szb, long long szh, long long batch) {
  extern __shared__ __align__(16) unsigned char smem[];
  u16* tiles = (u16*)smem;                                 // [2][BK][ROW]
  float* red = (float*)(smem + 2 * BK * ROW * 2);          // [WARPS][HP][RROW] partial scores
  u16* pt = (u16*)(red + WARPS * HP * RROW);               // [HP][PROW] the block's probabilities
  float* alpha_s = (float*)(pt + HP * PROW);               // [HP] each head's rescale for this block
  float* total_s = alpha_s + HP;                           // [HP] at the end: each head's softmax denominator

  const int b = blockIdx.x, split = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int dw0 = warp * DW;
  const long long span = (n_keys + SPLITS * BK - 1) / (SPLITS * BK) * BK;
  const long long k_begin = split * span;
  const long long k_end = k_begin + span < n_keys ? k_begin + span : n_keys;
  const int blocks = k_end > k_begin ? (int)((k_end - k_begin + BK - 1) / BK) : 0;
  const u16* eb = e + b * seb;

  if (blocks > 0) load_slice(tiles, eb, sen, dw0, k_begin, k_end);
  commit();
  if ((PREFETCH & 1) && blocks > 1) prefetch_slice(eb, sen, dw0, k_begin + BK, k_end);

  // Q'ᵀ [its dims, heads] as B fragments: b0 = (dims 2t, 2t+1; head g), b1 = (dims 2t+8, 2t+9; head g)
  u32 qf[KS][NT][2];
#pragma unroll
  for (int ks = 0; ks < KS; ++ks)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int head = nt * 8 + g;
      const u16* p = q + b * sqb + head * sqh + dw0 + ks * 16 + 2 * t;
      qf[ks][nt][0] = head < HEADS ? *(const u32*)p : 0u;
      qf[ks][nt][1] = head < HEADS ? *(const u32*)(p + 8) : 0u;
    }

  float acc[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) acc[mt][nt][0] = acc[mt][nt][1] = acc[mt][nt][2] = acc[mt][nt][3] = 0.f;
  // the softmax state of the heads this warp keeps (h = warp, warp + WARPS, ...), the same in every lane
  float top[(HP + WARPS - 1) / WARPS], total[(HP + WARPS - 1) / WARPS];
#pragma unroll
  for (int j = 0; j < (HP + WARPS - 1) / WARPS; ++j) top[j] = NEG_INF, total[j] = 0.f;

  for (int i = 0; i < blocks; ++i) {
    const long long k0 = k_begin + (long long)i * BK;
    // the next block's slice into the other stage (this warp read it last, in its block i - 1 products), then
    // this block's: one group in flight while the warp works
    if ((PREFETCH & 1) && i + 2 < blocks) prefetch_slice(eb, sen, dw0, k0 + 2 * BK, k_end);
    if (i + 1 < blocks && (!(ABLATE & 8) || i == 0))
      load_slice(tiles + ((i + 1) & 1) * BK * ROW, eb, sen, dw0, k0 + BK, k_end);
    commit();
    asm volatile("cp.async.wait_group 1;" ::: "memory");
    __syncwarp();
    const u16* tile = tiles + (i & 1) * BK * ROW;

    // 1. partial scores Sᵀ [BK, HP] over this warp's dims
    float s[2][NT][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks)
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        if (ABLATE & 1) continue;
        u32 a[4];
        ldmatrix_x4(a, tile + (mt * 16 + (lane & 15)) * ROW + dw0 + ks * 16 + (lane >> 4) * 8);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mma(s[mt][nt], a, qf[ks][nt]);
      }
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {  // c0, c1: key mt*16 + g, heads nt*8 + 2t, +1; c2, c3: key + 8
        float* r = red + (warp * HP + nt * 8 + 2 * t) * RROW + mt * 16 + g;
        r[0] = s[mt][nt][0], r[RROW] = s[mt][nt][1];
        r[8] = s[mt][nt][2], r[RROW + 8] = s[mt][nt][3];
      }
    __syncthreads();

    // 2. online softmax of this warp's heads over the block: lane = key
    const bool valid = k0 + lane < k_end;
#pragma unroll
    for (int j = 0; j < (HP + WARPS - 1) / WARPS; ++j) {
      const int h = warp + j * WARPS;
      if (h < HP && (ABLATE & 2)) {
        pt[h * PROW + lane] = f2h(1.f);
        if (lane == 0) alpha_s[h] = 1.f;
      } else if (h < HP) {
        float sc = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) sc += red[(w * HP + h) * RROW + lane];
        sc = valid ? sc : NEG_INF;
        const float new_top = fmaxf(top[j], warp_max(sc));  // finite: a block has a key
        const float p = valid ? __expf(sc - new_top) : 0.f;
        const float alpha = __expf(top[j] - new_top);
        total[j] = total[j] * alpha + warp_sum(p);
        top[j] = new_top;
        pt[h * PROW + lane] = f2h(p);
        if (lane == 0) alpha_s[h] = alpha;
      }
    }
    __syncthreads();

    // 3. Zᵀ[its dims, HP] = Zᵀ·alpha + Eᵀ[its dims, BK] · Pᵀ[BK, HP]
    float al[NT][2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) al[nt][0] = alpha_s[nt * 8 + 2 * t], al[nt][1] = alpha_s[nt * 8 + 2 * t + 1];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        acc[mt][nt][0] *= al[nt][0], acc[mt][nt][1] *= al[nt][1];
        acc[mt][nt][2] *= al[nt][0], acc[mt][nt][3] *= al[nt][1];
      }
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      u32 bf[NT][2];  // Pᵀ [keys, heads] as B fragments: P [heads][keys] row-major is its column-major form
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const u16* p = pt + (nt * 8 + g) * PROW + kk * 16 + 2 * t;
        bf[nt][0] = *(const u32*)p;
        bf[nt][1] = *(const u32*)(p + 8);
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        if (ABLATE & 4) continue;
        u32 a[4];  // Eᵀ [16 dims, 16 keys] from the tile's rows (keys) transposed
        ldmatrix_x4_trans(a, tile + (kk * 16 + (lane & 7) + ((lane >> 4) << 3)) * ROW + dw0 + mt * 16 +
                                 ((lane >> 3) & 1) * 8);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mma(acc[mt][nt], a, bf[nt]);
      }
    }
  }

  // the softmax denominators (and with splits the maxima) to every warp; then the output
#pragma unroll
  for (int j = 0; j < (HP + WARPS - 1) / WARPS; ++j) {
    const int h = warp + j * WARPS;
    if (h < HP && lane == 0) {
      total_s[h] = total[j];
      if (SPLITS > 1 && h < HEADS) {
        const long long row = ((long long)split * batch + b) * HEADS + h;
        stat[row * 2] = top[j];
        stat[row * 2 + 1] = total[j];
      }
    }
  }
  __syncthreads();
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int head = nt * 8 + 2 * t + c;
      if (head >= HEADS) continue;
      const float inv = SPLITS > 1 ? 1.f : 1.f / total_s[head];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int dim = dw0 + mt * 16 + g;
        if (SPLITS > 1) {
          float* w = ws + (((long long)split * batch + b) * HEADS + head) * D + dim;
          w[0] = acc[mt][nt][c];
          w[8] = acc[mt][nt][2 + c];
        } else {
          u16* o = z + b * szb + head * szh + dim;
          o[0] = f2h(acc[mt][nt][c] * inv);
          o[8] = f2h(acc[mt][nt][2 + c] * inv);
        }
      }
    }
}

// z[b, h] = Σ_s ws[s, b, h]·w_s / Σ_s total_s·w_s, w_s = exp(top_s − max top): the splits of absorbed_cross merged;
// a block per (slot, head)
extern "C" __global__ void absorbed_merge(const float* __restrict__ ws, const float* __restrict__ stat,
                                          u16* __restrict__ z, long long szb, long long szh, long long batch) {
  const int b = blockIdx.x, h = blockIdx.y;
  float w[SPLITS], top = NEG_INF, denominator = 0.f;
#pragma unroll
  for (int s = 0; s < SPLITS; ++s) top = fmaxf(top, stat[((s * batch + b) * HEADS + h) * 2]);
#pragma unroll
  for (int s = 0; s < SPLITS; ++s) {
    const long long row = (s * batch + b) * HEADS + h;
    w[s] = stat[row * 2 + 1] > 0.f ? __expf(stat[row * 2] - top) : 0.f;  // an empty split: no keys, no weight
    denominator += stat[row * 2 + 1] * w[s];
  }
  const float inv = 1.f / denominator;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float sum = 0.f;
#pragma unroll
    for (int s = 0; s < SPLITS; ++s) sum += ws[((s * batch + b) * HEADS + h) * (long long)D + d] * w[s];
    z[b * szb + h * szh + d] = f2h(sum * inv);
  }
}
