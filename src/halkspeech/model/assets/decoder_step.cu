// One batch-1 decoder step of Whisper (every layer, the final hidden state) in one persistent CUDA launch.
//
// Compiled at run time by NVRTC (model/cuda_rtc.py) with the -D defines of model/persistent.py's StepPlan, which
// also explains the design; in short: one block per SM, a step's 7 phases a layer separated by grid-wide
// barriers, and each block's share of the weights two phases ahead copied into shared memory (cp.async) so that
// no phase waits for HBM on its critical path: a phase is then a barrier, an activation read from L2, a few µs of
// arithmetic from shared memory and a store.
//
// Phases of layer l (x: the residual stream, float32, in global memory; rows split over the G blocks):
//   0 qkv    x' = LN1(x); rows of W_qkv: q → qbuf, new key/value → the self-attention cache at `position`
//   1 self   block (h, c): head h's attention over keys 0..position (recomputed by each of the C_OUT blocks of
//            head h: a few KB), then rows c of W_out[:, h] times it, added into x with atomics (split-K by head)
//   2 cq     x' = LN2(x); rows of W_cq → cq
//   3 cross  block (h, s): head h's attention over audio keys of split s (its keys/values prefetched), the
//            partial softmax (max, sum, unnormalised output) → part
//   4 co     every block merges the partial softmaxes; its rows of W_co: x += W_co·o + b
//   5 fc1    x' = LN3(x); rows of W_fc1: h = GELU(·) → hbuf
//   6 fc2    rows of W_fc2: x += W_fc2·h + b (the last layer also writes x in the model's dtype to out_x)
//
// Every tensor holds 16-bit floats (fp16, or bf16 with -DBF16=1) stored as u16 and converted here, so the
// source needs no CUDA headers (NVRTC without a toolkit). Data written during the launch is read with .cg loads
// (L2), never through L1, which other SMs do not keep coherent.

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define DH 64
#define NC (NT - 32)  // consumer threads: every warp but the last, which copies the weights in (the producer)
#define NW (NC / 32)   // consumer warps
#define NG (NC / 8)    // consumer groups of 8 lanes: a group reads 64 contiguous elements (8 × 16 bytes) at a time
#define PHASES 7
#ifndef PREFETCH
#define PREFETCH 1  // 0: no weights copied (timing experiments only: the results are wrong)
#endif
#ifndef FENCE
#define FENCE 1  // 0: no fence before a barrier's arrival (timing experiments only: unsafe)
#endif
#ifndef PHASE_MASK
#define PHASE_MASK 127  // phases run (timing experiments only)
#endif

struct LayerPtrs {  // the order of persistent.LAYER_FIELDS
  const u16 *qkv_w, *qkv_b, *ln1_g, *ln1_b, *out_w, *out_b, *ln2_g, *ln2_b, *cq_w, *cq_b, *co_w, *co_b, *ln3_g,
      *ln3_b, *fc1_w, *fc1_b, *fc2_w, *fc2_b;
};

__device__ __forceinline__ float to_f(u32 v) {
#if BF16
  return __uint_as_float((v & 0xffffu) << 16);
#else
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((u16)(v & 0xffffu)));
  return f;
#endif
}

__device__ __forceinline__ u16 from_f(float f) {
  u16 r;
#if BF16
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
#else
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
#endif
  return r;
}

__device__ __forceinline__ uint4 ldcg4(const u16* p) {
  uint4 v;
  asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ float ldcg(const float* p) {
  float v;
  asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
  return v;
}

// 8 weights (one 16-byte load) times 8 activations, float32 or 16-bit, in shared memory
__device__ __forceinline__ float dot8(uint4 w, const float* x) {
  const float4 a = *reinterpret_cast<const float4*>(x), b = *reinterpret_cast<const float4*>(x + 4);
  return to_f(w.x) * a.x + to_f(w.x >> 16) * a.y + to_f(w.y) * a.z + to_f(w.y >> 16) * a.w + to_f(w.z) * b.x +
         to_f(w.z >> 16) * b.y + to_f(w.w) * b.z + to_f(w.w >> 16) * b.w;
}

__device__ __forceinline__ float dot8(uint4 w, const u16* x) {
  const uint4 a = *reinterpret_cast<const uint4*>(x);
  return to_f(w.x) * to_f(a.x) + to_f(w.x >> 16) * to_f(a.x >> 16) + to_f(w.y) * to_f(a.y) +
         to_f(w.y >> 16) * to_f(a.y >> 16) + to_f(w.z) * to_f(a.z) + to_f(w.z >> 16) * to_f(a.z >> 16) +
         to_f(w.w) * to_f(a.w) + to_f(w.w >> 16) * to_f(a.w >> 16);
}

__device__ __forceinline__ void unpack8(uint4 v, float* out) {
  out[0] = to_f(v.x), out[1] = to_f(v.x >> 16), out[2] = to_f(v.y), out[3] = to_f(v.y >> 16);
  out[4] = to_f(v.z), out[5] = to_f(v.z >> 16), out[6] = to_f(v.w), out[7] = to_f(v.w >> 16);
}

// the consumer warps' barrier (named barrier 1): the producer warp never waits with them
__device__ __forceinline__ void csync() { asm volatile("bar.sync 1, %0;" ::"n"(NC) : "memory"); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// sum within each group of 8 lanes (every lane of the warp must call it)
__device__ __forceinline__ float group_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 4);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  return v + __shfl_xor_sync(0xffffffffu, v, 1);
}

// the block's sum (max) of every thread's v, returned to every thread; red: NW floats of shared memory
__device__ float block_sum(float v, float* red) {
  v = warp_sum(v);
  csync();
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  csync();
  return warp_sum((threadIdx.x & 31) < NW ? red[threadIdx.x & 31] : 0.f);
}

__device__ float block_max(float v, float* red) {
  v = warp_max(v);
  csync();
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  csync();
  return warp_max((threadIdx.x & 31) < NW ? red[threadIdx.x & 31] : -3.0e38f);
}

// ---- copies into shared memory: the producer warp ----
//
// The last warp of a block copies each phase's share (weights, bias, LayerNorm; the cross phase's keys and values)
// into a buffer with Ampere's cp.async, 16 bytes a lane, and each lane's copies arrive on the buffer's `full`
// mbarrier once they land (cp.async.mbarrier.arrive.noinc: 32 arrivals a phase). Only this warp stalls while the
// copies drain: when every warp issued them, they held up each phase's __syncthreads (1.50 ms a large-v3 step,
// against 1.04 with no copies; bench/NOTES.md), and bulk copies (the copy engine) streamed slower still.

__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void mbar_init(u64* bar, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}

__device__ __forceinline__ void mbar_arrive(u64* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}

// wait for the phase of `bar` with this parity to complete
__device__ __forceinline__ void mbar_wait(u64* bar, u32 parity) {
  u32 done = 0;
  while (!done)
    asm volatile(
        "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
}

struct Copier {  // the producer warp's lanes: lane i copies 16-byte pieces i, i+32, ...
  __device__ __forceinline__ void run(char* dst, const void* src, int bytes) {
    if (!PREFETCH) return;
    const char* s = reinterpret_cast<const char*>(src);
    for (int i = (threadIdx.x & 31) * 16; i < bytes; i += 32 * 16)
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(dst + i)), "l"(s + i) : "memory");
  }
  // bias[r0 .. r0+n) as the aligned run bias[r0 & ~7 ..): element r0+i lands at index (r0 & 7) + i
  __device__ __forceinline__ void bias(char* dst, const u16* b, int r0, int n) {
    const int a0 = r0 & ~7, a1 = (r0 + n + 7) & ~7;
    run(dst, b + a0, (a1 - a0) * 2);
  }
  // a block's weight rows [r0, r0+n) of an [N, K] matrix, its bias run and, with ln, a LayerNorm's weight and bias
  __device__ __forceinline__ void share(char* buf, const u16* w, const u16* b, int N, int K, int rows, int bias_off,
                                        const u16* ln_g = 0, const u16* ln_b = 0, int ln_off = 0) {
    const int r0 = blockIdx.x * rows, n = min(rows, N - r0);
    if (n <= 0) return;
    run(buf, w + (long long)r0 * K, n * K * 2);
    bias(buf + bias_off, b, r0, n);
    if (ln_g) {
      run(buf + ln_off, ln_g, D * 2);
      run(buf + ln_off + D * 2, ln_b, D * 2);
    }
  }
};

// ---- dot products of rows with one vector ----

// For rows r < nrows of w (row stride `stride` elements, K elements each, K a multiple of 64, in shared memory):
// epi(r, x · w[r]). Groups of 8 lanes each take a row, or a part of one when there are fewer rows than groups;
// parts meet in `part` (NG floats of shared memory).
template <typename X, typename Epi>
__device__ __forceinline__ void rows_dot(const u16* w, int nrows, int stride, int K, const X* x, float* part, Epi epi) {
  const int g = threadIdx.x >> 3, lane = threadIdx.x & 7;
  int parts = nrows < NG ? NG / nrows : 1;
  if (parts > K / 64) parts = K / 64;
  const int kp = (K / 64 + parts - 1) / parts * 64;
  parts = (K + kp - 1) / kp;
  const int items = nrows * parts;
  for (int base = 0; base < items; base += NG) {  // uniform over the block: every lane reaches the shuffles
    const int it = base + g;
    float acc = 0.f;
    if (it < items) {
      const int r = it / parts, p = it - r * parts;
      const u16* wr = w + r * stride;
      const int k1 = min(K, (p + 1) * kp);
#pragma unroll 4
      for (int k = p * kp + lane * 8; k < k1; k += 64) acc += dot8(*reinterpret_cast<const uint4*>(wr + k), x + k);
    }
    acc = group_sum(acc);
    if (lane == 0 && it < items) {
      if (parts == 1)
        epi(it, acc);
      else
        part[it] = acc;
    }
  }
  if (parts > 1) {
    csync();
    for (int r = threadIdx.x; r < nrows; r += NC) {
      float s = 0.f;
      for (int p = 0; p < parts; ++p) s += part[r * parts + p];
      epi(r, s);
    }
  }
}

// out[i] = LN(x)[i] for the D floats in `act` (already loaded), with the LayerNorm's weight and bias in shared memory
__device__ __forceinline__ void layer_norm(float* act, const u16* g, const u16* b, float* red) {
  float s = 0.f;
  for (int i = threadIdx.x; i < D; i += NC) s += act[i];
  const float mean = block_sum(s, red) * (1.f / D);
  float q = 0.f;
  for (int i = threadIdx.x; i < D; i += NC) {
    const float d = act[i] - mean;
    q += d * d;
  }
  const float rstd = rsqrtf(block_sum(q, red) * (1.f / D) + 1e-5f);
  for (int i = threadIdx.x; i < D; i += NC) act[i] = (act[i] - mean) * rstd * to_f(g[i]) + to_f(b[i]);
  csync();
}

__device__ __forceinline__ void load_x(float* act, const float* x) {
  for (int i = threadIdx.x; i < D; i += NC) act[i] = ldcg(x + i);
}

// The output of one head's attention from per-thread partial sums acc[8] (dims (lane & 7) * 8 ...): the 4 groups
// of a warp, then the NW warps through `scratch` (NW * 64 floats) → out[0..63] = sum * scale
__device__ __forceinline__ void reduce_head(float* acc, float* scratch, float* out, float scale) {
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    acc[e] += __shfl_xor_sync(0xffffffffu, acc[e], 8);
    acc[e] += __shfl_xor_sync(0xffffffffu, acc[e], 16);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane < 8)
#pragma unroll
    for (int e = 0; e < 8; ++e) scratch[warp * 64 + lane * 8 + e] = acc[e];
  csync();
  if (threadIdx.x < DH) {
    float o = 0.f;
    for (int w = 0; w < NW; ++w) o += scratch[w * 64 + threadIdx.x];
    out[threadIdx.x] = o * scale;
  }
  csync();
}

// ---- the grid-wide barrier ----

// bar[0] counts arrivals over the whole launch (each barrier waits for G more); bar[1] counts blocks leaving, and
// the last one zeroes both for the next launch; bar[2] is set when a wait gives up (SPIN_LIMIT polls, or another
// block gave up), which turns a hang (a block that could never run, say) into a wrong step the host can see
// (PersistentStep.check); a block that gave up waits no more in this launch.
__device__ __forceinline__ void arrive_and_wait(u32* bar, u32 target, bool& broken) {
  if (threadIdx.x == 0) {
    if (FENCE) __threadfence();  // this block's writes of the phase (ordered before by the consumer barrier)
    atomicAdd(bar, 1u);
    u32 v;
    for (long long spins = 0; !broken; ++spins) {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(bar) : "memory");
      if (v >= target) break;
      if ((spins & 1023) == 1023 && (spins > SPIN_LIMIT || *(volatile u32*)(bar + 2))) {
        atomicOr(bar + 2, 1u);
        broken = true;
      }
    }
  }
}

// ---- the kernel ----

struct Ctx {
  const LayerPtrs* layers;  // in shared memory
  const u16 *emb, *pos_emb, *cross_k, *cross_v;
  u16* self_kv;
  long long kv_layer, x_layer, x_head;
  int token, pos;
  float *xres, *qbuf, *cq, *part_ws;
  u16 *hbuf, *out_x;
  float *act, *scores, *red, *part, *qv, *ov, *xrow;  // shared memory
};

// Phase k's share (weights, bias, LayerNorm; the cross phase's keys and values) as runs for `cp`
__device__ __forceinline__ void share_of(const Ctx& c, int k, char* buf, Copier& cp) {
  const int l = k / PHASES, b = blockIdx.x;
  const LayerPtrs& p = c.layers[l];
  switch (k % PHASES) {
    case 0:
      cp.share(buf, p.qkv_w, p.qkv_b, 3 * D, D, RP_QKV, BIAS_OFF_0, p.ln1_g, p.ln1_b, LN_OFF_0);
      break;
    case 1:
      if (b < H * C_OUT && (b % C_OUT) * RC < D) {
        const int h = b / C_OUT, n0 = (b % C_OUT) * RC, n = min(RC, D - n0);
        for (int r = 0; r < n; ++r) cp.run(buf + r * DH * 2, p.out_w + (long long)(n0 + r) * D + h * DH, DH * 2);
        cp.bias(buf + BIAS_OFF_1, p.out_b, n0, n);
      }
      break;
    case 2:
      cp.share(buf, p.cq_w, p.cq_b, D, D, RP_D, BIAS_OFF_2, p.ln2_g, p.ln2_b, LN_OFF_2);
      break;
    case 3:
      if (b < H * S_X && (b % S_X) * KS < A) {
        const int h = b / S_X, t0 = (b % S_X) * KS, n = min(KS, A - t0);
        const long long at = l * c.x_layer + h * c.x_head + (long long)t0 * DH;
        cp.run(buf, c.cross_k + at, n * DH * 2);
        cp.run(buf + KS * DH * 2, c.cross_v + at, n * DH * 2);
      }
      break;
    case 4:
      cp.share(buf, p.co_w, p.co_b, D, D, RP_D, BIAS_OFF_4);
      break;
    case 5:
      cp.share(buf, p.fc1_w, p.fc1_b, 4 * D, D, RP_FC1, BIAS_OFF_5, p.ln3_g, p.ln3_b, LN_OFF_5);
      break;
    case 6:
      cp.share(buf, p.fc2_w, p.fc2_b, D, 4 * D, RP_D, BIAS_OFF_6);
      break;
  }
}

// The producer warp: every phase's share into buffer k & 1 once the consumers are done with phase k - 2 there
__device__ void produce(const Ctx& c, char* smem, u64* full, u64* free_) {
  Copier cp;
  for (int k = 0; k < L * PHASES; ++k) {
    if (k >= 2) mbar_wait(free_ + (k & 1), ((k - 2) >> 1) & 1);
    share_of(c, k, smem + (k & 1) * BUF_BYTES, cp);
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(smem_addr(full + (k & 1))) : "memory");
  }
  asm volatile("cp.async.wait_all;" ::: "memory");
}

__device__ void phase_qkv(const Ctx& c, int l, const char* buf) {
  const int r0 = blockIdx.x * RP_QKV, n = min(RP_QKV, 3 * D - r0);
  if (n <= 0) return;
  if (l == 0) {  // the step's input: token and positional embedding, into x by block 0
    for (int i = threadIdx.x; i < D; i += NC) {
      const float v = to_f(c.emb[(long long)c.token * D + i]) + to_f(c.pos_emb[(long long)c.pos * D + i]);
      c.act[i] = v;
      if (blockIdx.x == 0) c.xres[i] = v;
    }
  } else {
    load_x(c.act, c.xres);
  }
  const u16* ln = reinterpret_cast<const u16*>(buf + LN_OFF_0);
  layer_norm(c.act, ln, ln + D, c.red);
  const u16* bias = reinterpret_cast<const u16*>(buf + BIAS_OFF_0) + (r0 & 7);
  u16* kv = c.self_kv + l * c.kv_layer + (long long)c.pos * 2 * D;  // this position's keys, then values
  float* q = c.qbuf;
  rows_dot(reinterpret_cast<const u16*>(buf), n, D, D, c.act, c.part, [&](int r, float v) {
    const int o = r0 + r;
    v += to_f(bias[r]);
    if (o < D)
      q[o] = v;
    else
      kv[o - D] = from_f(v);
  });
}

#define MAXI ((NCTX + NG - 1) / NG)  // keys a group reads at most in self-attention

__device__ void phase_self(const Ctx& c, int l, const char* buf) {
  const int b = blockIdx.x;
  if (b >= H * C_OUT || (b % C_OUT) * RC >= D) return;
  const int h = b / C_OUT, n0 = (b % C_OUT) * RC, n = min(RC, D - n0), keys = c.pos + 1;
  const int g = threadIdx.x >> 3, lane = threadIdx.x & 7;
  if (threadIdx.x < DH) c.qv[threadIdx.x] = ldcg(c.qbuf + h * DH + threadIdx.x);
  // every key and value this group needs, loaded at once (they were written by earlier steps and phase qkv)
  const u16* base = c.self_kv + l * c.kv_layer + h * DH + lane * 8;
  uint4 kr[MAXI], vr[MAXI];
#pragma unroll
  for (int i = 0; i < MAXI; ++i) {
    const int t = g + NG * i;
    if (t < keys) {
      kr[i] = ldcg4(base + (long long)t * 2 * D);
      vr[i] = ldcg4(base + (long long)t * 2 * D + D);
    }
  }
  csync();  // qv
  float sc[MAXI], m = -3.0e38f;
#pragma unroll
  for (int i = 0; i < MAXI; ++i) {
    const bool on = g + NG * i < keys;
    sc[i] = group_sum(on ? dot8(kr[i], c.qv + lane * 8) : 0.f) * 0.125f;  // 1/sqrt(DH)
    if (on) m = fmaxf(m, sc[i]);
  }
  m = block_max(m, c.red);
  float sum = 0.f, acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int i = 0; i < MAXI; ++i) {
    if (g + NG * i < keys) {
      const float p = __expf(sc[i] - m);
      sum += p;
      float v[8];
      unpack8(vr[i], v);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] += p * v[e];
    }
  }
  sum = block_sum(lane == 0 ? sum : 0.f, c.red);
  reduce_head(acc, c.act, c.ov, 1.f / sum);
  const u16* bias = reinterpret_cast<const u16*>(buf + BIAS_OFF_1) + (n0 & 7);
  float* x = c.xres + n0;
  rows_dot(reinterpret_cast<const u16*>(buf), n, DH, DH, c.ov, c.part, [&](int r, float v) {
    if (h == 0) v += to_f(bias[r]);
    atomicAdd(x + r, v);
  });
}

// LayerNorm of x, then rows of a [N, D] matrix: epi(output row, value + bias)
template <typename Epi>
__device__ __forceinline__ void ln_rows(const Ctx& c, const char* buf, int N, int rows, int bias_off, int ln_off, Epi epi) {
  const int r0 = blockIdx.x * rows, n = min(rows, N - r0);
  if (n <= 0) return;
  load_x(c.act, c.xres);
  const u16* ln = reinterpret_cast<const u16*>(buf + ln_off);
  layer_norm(c.act, ln, ln + D, c.red);
  const u16* bias = reinterpret_cast<const u16*>(buf + bias_off) + (r0 & 7);
  rows_dot(reinterpret_cast<const u16*>(buf), n, D, D, c.act, c.part,
           [&](int r, float v) { epi(r0 + r, v + to_f(bias[r])); });
}

__device__ void phase_cross(const Ctx& c, const char* buf) {
  const int b = blockIdx.x;
  if (b >= H * S_X || (b % S_X) * KS >= A) return;
  const int h = b / S_X, s = b % S_X, keys = min(KS, A - (b % S_X) * KS);
  const int g = threadIdx.x >> 3, lane = threadIdx.x & 7;
  if (threadIdx.x < DH) c.qv[threadIdx.x] = ldcg(c.cq + h * DH + threadIdx.x) * 0.125f;
  csync();
  const u16* kk = reinterpret_cast<const u16*>(buf);
  const u16* vv = kk + KS * DH;
  float* sc = c.scores;
  rows_dot(kk, keys, DH, DH, c.qv, c.part, [&](int r, float v) { sc[r] = v; });
  csync();
  float m = -3.0e38f;
  for (int t = threadIdx.x; t < keys; t += NC) m = fmaxf(m, sc[t]);
  m = block_max(m, c.red);
  float sum = 0.f;
  for (int t = threadIdx.x; t < keys; t += NC) {
    const float p = __expf(sc[t] - m);
    sc[t] = p;
    sum += p;
  }
  sum = block_sum(sum, c.red);  // its syncs also publish sc
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int t = g; t < keys; t += NG) {
    const float p = sc[t];
    float v[8];
    unpack8(*reinterpret_cast<const uint4*>(vv + t * DH + lane * 8), v);
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] += p * v[e];
  }
  float* out = c.part_ws + (h * S_X + s) * (DH + 2);
  reduce_head(acc, c.act, out + 2, 1.f);
  if (threadIdx.x == 0) out[0] = m, out[1] = sum;
}

// every block: the partial softmaxes of phase cross merged into o (D floats in act)
__device__ __forceinline__ void merge_cross(const Ctx& c) {
  for (int i = threadIdx.x; i < D; i += NC) {
    const float* p = c.part_ws + (i / DH) * S_X * (DH + 2);
    float m[S_X], l[S_X], o[S_X], top = -3.0e38f;
#pragma unroll
    for (int s = 0; s < S_X; ++s) {
      m[s] = ldcg(p + s * (DH + 2));
      l[s] = ldcg(p + s * (DH + 2) + 1);
      o[s] = ldcg(p + s * (DH + 2) + 2 + i % DH);
    }
#pragma unroll
    for (int s = 0; s < S_X; ++s) top = fmaxf(top, m[s]);
    float num = 0.f, den = 0.f;
#pragma unroll
    for (int s = 0; s < S_X; ++s) {
      const float e = __expf(m[s] - top);
      num += e * o[s];
      den += e * l[s];
    }
    c.act[i] = num / den;
  }
}

// x += rows · act + bias for the block's rows of an [D, K] matrix (K floats of act or K 16-bit values of act16)
template <typename X>
__device__ __forceinline__ void residual_rows(const Ctx& c, const char* buf, int K, const X* act, int bias_off, bool last) {
  const int r0 = blockIdx.x * RP_D, n = min(RP_D, D - r0);
  const u16* bias = reinterpret_cast<const u16*>(buf + bias_off) + (r0 & 7);
  float* x = c.xres + r0;
  const float* xr = c.xrow;
  u16* out = c.out_x + r0;
  rows_dot(reinterpret_cast<const u16*>(buf), n, K, K, act, c.part, [&](int r, float v) {
    const float y = xr[r] + v + to_f(bias[r]);
    x[r] = y;
    if (last) out[r] = from_f(y);
  });
}

__device__ void phase_co(const Ctx& c, const char* buf) {
  const int r0 = blockIdx.x * RP_D, n = min(RP_D, D - r0);
  if (n <= 0) return;
  if (threadIdx.x < n) c.xrow[threadIdx.x] = ldcg(c.xres + r0 + threadIdx.x);
  merge_cross(c);
  csync();
  residual_rows(c, buf, D, c.act, BIAS_OFF_4, false);
}

__device__ void phase_fc2(const Ctx& c, const char* buf, bool last) {
  const int r0 = blockIdx.x * RP_D, n = min(RP_D, D - r0);
  if (n <= 0) return;
  if (threadIdx.x < n) c.xrow[threadIdx.x] = ldcg(c.xres + r0 + threadIdx.x);
  u16* h = reinterpret_cast<u16*>(c.act);  // the GELU activations, 4D 16-bit values
  for (int i = threadIdx.x; i < 4 * D / 8; i += NC) *reinterpret_cast<uint4*>(h + i * 8) = ldcg4(c.hbuf + i * 8);
  csync();
  residual_rows(c, buf, 4 * D, static_cast<const u16*>(h), BIAS_OFF_6, last);
}

extern "C" __global__ void __launch_bounds__(NT, 1)
    decoder_step(const LayerPtrs* __restrict__ layers, const u16* __restrict__ emb, const u16* __restrict__ pos_emb,
                 const long long* __restrict__ token, const long long* __restrict__ position, u16* self_kv,
                 const u16* __restrict__ cross_k, const u16* __restrict__ cross_v, long long kv_layer,
                 long long x_layer, long long x_head, float* xres, float* qbuf, float* cq, float* part_ws, u16* hbuf,
                 u16* out_x, u32* bar) {
  extern __shared__ __align__(16) char smem[];
  Ctx c;
  {
    unsigned long long* table = reinterpret_cast<unsigned long long*>(smem + PTR_OFF);
    const unsigned long long* src = reinterpret_cast<const unsigned long long*>(layers);
    for (int i = threadIdx.x; i < L * 18; i += NC) table[i] = src[i];
    c.layers = reinterpret_cast<const LayerPtrs*>(table);
  }
  c.emb = emb, c.pos_emb = pos_emb, c.cross_k = cross_k, c.cross_v = cross_v, c.self_kv = self_kv;
  c.kv_layer = kv_layer, c.x_layer = x_layer, c.x_head = x_head;
  c.token = (int)token[0], c.pos = (int)position[0];
  c.xres = xres, c.qbuf = qbuf, c.cq = cq, c.part_ws = part_ws, c.hbuf = hbuf, c.out_x = out_x;
  c.act = reinterpret_cast<float*>(smem + ACT_OFF);
  c.scores = reinterpret_cast<float*>(smem + SCORES_OFF);
  c.red = reinterpret_cast<float*>(smem + RED_OFF);
  c.part = reinterpret_cast<float*>(smem + PART_OFF);
  c.qv = reinterpret_cast<float*>(smem + QV_OFF);
  c.ov = reinterpret_cast<float*>(smem + OV_OFF);
  c.xrow = reinterpret_cast<float*>(smem + XROW_OFF);
  __syncthreads();  // the pointer table

  const int total = L * PHASES;
  u64* full = reinterpret_cast<u64*>(smem + MBAR_OFF);  // per buffer: its share has landed (32 lane arrivals)
  u64* free_ = full + 2;                                 // per buffer: the consumers are done with it (1 arrival)
  if (threadIdx.x == 0) {
    mbar_init(full, 32), mbar_init(full + 1, 32), mbar_init(free_, 1), mbar_init(free_ + 1, 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (threadIdx.x >= NC) {  // the producer warp takes no part in the phases or the grid barriers
    produce(c, smem, full, free_);
    return;
  }
  bool broken = false;  // thread 0's: a barrier of this launch gave up
  for (int k = 0; k < total; ++k) {
    const int l = k / PHASES;
    const char* buf = smem + (k & 1) * BUF_BYTES;
    mbar_wait(full + (k & 1), (k >> 1) & 1);
    switch ((PHASE_MASK >> (k % PHASES)) & 1 ? k % PHASES : -1) {
      case 0: phase_qkv(c, l, buf); break;
      case 1: phase_self(c, l, buf); break;
      case 2: {
        float* cq = c.cq;
        ln_rows(c, buf, D, RP_D, BIAS_OFF_2, LN_OFF_2, [&](int o, float v) { cq[o] = v; });
        break;
      }
      case 3: phase_cross(c, buf); break;
      case 4: phase_co(c, buf); break;
      case 5: {
        u16* hb = c.hbuf;
        ln_rows(c, buf, 4 * D, RP_FC1, BIAS_OFF_5, LN_OFF_5,
                [&](int o, float v) { hb[o] = from_f(0.5f * v * (1.f + erff(v * 0.70710678118654752f))); });
        break;
      }
      case 6: phase_fc2(c, buf, l == L - 1); break;
    }
    csync();  // this phase is done with its buffer and its global writes are issued
    if (threadIdx.x == 0) mbar_arrive(free_ + (k & 1));
    if (k + 1 < total) arrive_and_wait(bar, (u32)(k + 1) * G, broken);
    csync();
  }
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(bar + 1, 1u) == G - 1) {  // every block is past every barrier: reset for the next launch
      bar[0] = 0;
      bar[1] = 0;
      __threadfence();
    }
  }
}
