// Tandem's CUDA kernels, compiled at run time with NVRTC. No CUDA headers are needed: bf16 values
// travel as raw 16-bit words and are widened to float by a shift; the tensor-core products use
// inline PTX (mma.sync m16n8k16, bf16 in, f32 accumulate).
//
// KV cache layout (same as the CPU engine's, so a block exports as one contiguous range):
//   block b: [layer][k|v][slot][kv_head][head_dim]   (bf16)
// or, for the FP8 cache (the kernels' `_f8` forms, rope_store's kv_fp8), the same rows as E4M3
// bytes followed by one f32 scale per row, [layer][k|v][slot][kv_head]: a row's values are its
// bytes times its scale (its largest magnitude / 448, set when the token is written).

typedef unsigned short bf16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define NEG_INF (-__int_as_float(0x7f800000))
#define LOG2E 1.4426950408889634f

__device__ __forceinline__ float bf2f(bf16 h) { return __uint_as_float(((u32)h) << 16); }

__device__ __forceinline__ bf16 f2bf(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7f800000u) == 0x7f800000u) {
        // Inf stays Inf; NaN stays NaN (quiet bit set).
        return (bf16)((u >> 16) | ((u & 0x7fffffu) ? 0x40u : 0u));
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

__device__ __forceinline__ u32 pack_bf2(float lo, float hi) { return (u32)f2bf(lo) | ((u32)f2bf(hi) << 16); }

__device__ __forceinline__ void unpack8(uint4 v, float* out) {
    u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        out[2 * i] = __uint_as_float(w[i] << 16);
        out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

__device__ __forceinline__ uint4 ldg_stream(const void* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

// Programmatic dependent launch (sm_90 and later). A kernel launched as a dependent may start
// while the kernel ahead of it in the stream is still running: `pdl_wait` blocks until that
// kernel has finished and its writes are visible, so a dependent reads nothing the kernel ahead
// writes, and writes nothing it reads, before it. `pdl_trigger` lets the next kernel's blocks be
// scheduled once every block of this one has called it (or exited). Both do nothing on older
// architectures and in kernels not launched as dependents.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block; every thread gets the result. `scratch` holds 32 floats.
__device__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < nw ? scratch[lane] : 0.f;
    return warp_sum(t);
}

__device__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < nw ? scratch[lane] : NEG_INF;
    return warp_max(t);
}

// E4M3 bytes (FP8 weights and the FP8 KV cache).
//
// A byte s eeee mmm widens to the f32 whose bits are s 0000 eeee mmm 0…0 by moving bits alone
// (no table, no conversion instruction): that float is the byte's value times 2^-120, the
// exponent bias being 7 against f32's 127 (E4M3 subnormals land on f32 subnormals with the same
// factor). Sums are taken over those floats and multiplied once by scale · 2^120 at the end.

#define FP8_UNBIAS __int_as_float(0x7b800000)  // 2^120

__device__ __forceinline__ void fp8x4_widen(u32 w, float* f) {
    f[0] = __uint_as_float(((w << 24) & 0x80000000u) | ((w << 20) & 0x07f00000u));
    f[1] = __uint_as_float(((w << 16) & 0x80000000u) | ((w << 12) & 0x07f00000u));
    f[2] = __uint_as_float(((w << 8) & 0x80000000u) | ((w << 4) & 0x07f00000u));
    f[3] = __uint_as_float((w & 0x80000000u) | ((w >> 4) & 0x07f00000u));
}

// The E4M3 byte nearest to v (ties to even), saturating at ±448 (the format's largest finite
// value); NaN never occurs (v comes from finite weights divided by a positive scale).
__device__ __forceinline__ u32 f2e4m3(float v) {
    const u32 sign = (__float_as_uint(v) >> 24) & 0x80u;
    const float a = fminf(fabsf(v), 448.f);
    if (a < 0.015625f) return sign | (u32)rintf(a * 512.f);  // subnormals: m · 2^-9 (m = 8 is 2^-6)
    u32 u = __float_as_uint(a);
    u += 0x7ffffu + ((u >> 20) & 1u);  // round the mantissa to 3 bits, ties to even
    const u32 e = (u >> 23) - 120u;    // rebias 127 → 7
    const u32 code = (e << 3) | ((u >> 20) & 7u);
    return sign | (code > 0x7eu ? 0x7eu : code);
}

// Bytes of one block of the FP8 KV cache: E4M3 rows, then their f32 scales.
__device__ __forceinline__ u64 kv8_block_bytes(int layers, int block_size, int kv_heads, int hd) {
    return (u64)layers * 2 * block_size * kv_heads * (hd + 4);
}

// Eight E4M3 bytes of an FP8 cache row, times the row's scale, as eight bf16 (one 16-byte word).
__device__ __forceinline__ uint4 kv8_widen8(uint2 w, float scale) {
    float f[8];
    fp8x4_widen(w.x, f);
    fp8x4_widen(w.y, f + 4);
#pragma unroll
    for (int i = 0; i < 8; i++) f[i] = f[i] * FP8_UNBIAS * scale;
    return make_uint4(pack_bf2(f[0], f[1]), pack_bf2(f[2], f[3]), pack_bf2(f[4], f[5]), pack_bf2(f[6], f[7]));
}

// ---------------------------------------------------------------------------------------------
// Initialisation: deterministic pseudo-random fill, for benchmark weights and KV (never zeros).

__device__ __forceinline__ u64 mix64(u64 z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ float unit_float(u64 h) { return (float)(h >> 40) * (1.0f / 16777216.0f); }

extern "C" __global__ void fill_uniform_bf16(bf16* p, u64 n, u64 seed, float scale, float offset) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float u = unit_float(mix64(seed ^ mix64(i)));
        p[i] = f2bf(offset + scale * (2.f * u - 1.f));
    }
}

// ---------------------------------------------------------------------------------------------
// Embedding lookup into the f32 residual stream.

// Turns the E4M3 NaN codes (S.1111.111) among `words` 32-bit words into the largest finite
// magnitude: a random fill of an FP8 cache then holds only numbers.
extern "C" __global__ void fp8_clear_nan(u32* p, u64 words) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < words; i += (u64)gridDim.x * blockDim.x) {
        u32 w = p[i];
        const u32 nan = ((w & 0x7f7f7f7fu) + 0x01010101u) & 0x80808080u;   // bytes whose low 7 bits are all ones
        p[i] = w - (nan >> 7);
    }
}

extern "C" __global__ void embed(const int* tokens, const bf16* table, float* x, int d) {
    const bf16* row = table + (u64)tokens[blockIdx.x] * d;
    float* out = x + (u64)blockIdx.x * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) out[j] = bf2f(row[j]);
}

// RMSNorm of f32 rows into bf16: out[r] = x[rows[r]] / rms * w. `rows` may be null (identity);
// it picks the rows whose logits are wanted before the final norm.
extern "C" __global__ void rms_norm(const float* x, const int* rows, const bf16* w, bf16* out, int d, float eps) {
    pdl_wait();
    pdl_trigger();
    __shared__ float scratch[32];
    int r = rows ? rows[blockIdx.x] : blockIdx.x;
    const float* xr = x + (u64)r * d;
    float ss = 0.f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) ss += xr[j] * xr[j];
    float inv = rsqrtf(block_sum(ss, scratch) / d + eps);
    bf16* o = out + (u64)blockIdx.x * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) o[j] = f2bf(xr[j] * inv * bf2f(w[j]));
}

// gate|up rows of width 2f → silu(gate) * up, width f.
extern "C" __global__ void silu_mul(const bf16* gu, bf16* out, int f, u64 total) {
    pdl_wait();
    pdl_trigger();
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        u64 row = i / f, col = i % f;
        float g = bf2f(gu[row * 2 * f + col]);
        float u = bf2f(gu[row * 2 * f + f + col]);
        out[i] = f2bf(g / (1.f + __expf(-g)) * u);
    }
}

// ---------------------------------------------------------------------------------------------
// Per (token, head): optional q/k/v bias, optional per-head RMSNorm of q and k (Qwen3), RoPE on
// q and k heads, then k and v heads written into the token's cache slot (skipped for slot < 0,
// the padding rows of a captured batch). q heads are rotated in place in the qkv row. With
// kv_fp8 the k and v rows go into an FP8 cache as E4M3 bytes of the row over its scale.
// Grid (tokens, ceil((heads + 2·kv_heads) / heads_per_block)), hd/2 threads: thread j owns the
// rotation pair of frequency j, computes its angle once and applies it to each head of the block
// in turn. Passes of many tokens take several heads a block (a block per token and head is
// hundreds of thousands of 64-thread blocks a layer at long prompts, bound by block scheduling,
// not bytes); passes of a few tokens take one, for the shortest chain.
extern "C" __global__ void rope_store(bf16* qkv, const float* bias, const bf16* q_norm, const bf16* k_norm,
                                      const int* positions, const int* slots, const float* inv_freq,
                                      bf16* cache, int layer, int layers, int heads, int kv_heads, int hd,
                                      int block_size, int interleaved, float eps, int heads_per_block, int kv_fp8) {
    pdl_wait();
    pdl_trigger();
    __shared__ float scratch[32];
    const int t = blockIdx.x, j = threadIdx.x, half = hd / 2;
    const int n_heads = heads + 2 * kv_heads;
    const int width = n_heads * hd;
    const int a = interleaved ? 2 * j : j;
    const int b = interleaved ? 2 * j + 1 : j + half;
    // The angle in double, reduced to one turn, then single-precision sine and cosine.
    double ang = (double)positions[t] * (double)inv_freq[j];
    ang -= 6.283185307179586 * floor(ang * 0.15915494309189535);
    float s, c;
    sincosf((float)ang, &s, &c);
    const int slot = slots[t];
    const int kvw = kv_heads * hd;
    const u64 block_elems = (u64)layers * 2 * block_size * kvw;
    const int h_end = min(n_heads, (blockIdx.y + 1) * heads_per_block);
    for (int h = blockIdx.y * heads_per_block; h < h_end; h++) {
        bf16* v = qkv + (u64)t * width + (u64)h * hd;
        float x1 = bf2f(v[a]), x2 = bf2f(v[b]);
        if (bias) {
            x1 += bias[h * hd + a];
            x2 += bias[h * hd + b];
        }
        const bool is_v = h >= heads + kv_heads;
        if (!is_v) {
            if (q_norm) {
                float ss = block_sum(x1 * x1 + x2 * x2, scratch);
                float inv = rsqrtf(ss / hd + eps);
                const bf16* w = h < heads ? q_norm : k_norm;
                x1 *= inv * bf2f(w[a]);
                x2 *= inv * bf2f(w[b]);
            }
            float r1 = x1 * c - x2 * s, r2 = x2 * c + x1 * s;
            x1 = r1;
            x2 = r2;
        }
        if (h < heads) {
            v[a] = f2bf(x1);
            v[b] = f2bf(x2);
            continue;
        }
        if (slot < 0) continue;
        const int kv = is_v ? 1 : 0;
        const int head = h - heads - kv * kv_heads;
        if (kv_fp8) {
            // The row's scale from its largest magnitude (the block holds the whole row).
            const float amax = block_max(fmaxf(fabsf(x1), fabsf(x2)), scratch);
            // Scales stop at 128 (rows past 57,344 in magnitude saturate): the readers multiply
            // a scale by 2^120 and must stay finite.
            const float sc = amax > 0.f ? fminf(amax / 448.f, 128.f) : 1.f;
            const u64 row = (u64)(layer * 2 + kv) * block_size + slot % block_size;
            unsigned char* blk = (unsigned char*)cache + (u64)(slot / block_size) * kv8_block_bytes(layers, block_size, kv_heads, hd);
            unsigned char* dst = blk + row * kvw + (u64)head * hd;
            dst[a] = (unsigned char)f2e4m3(x1 / sc);
            dst[b] = (unsigned char)f2e4m3(x2 / sc);
            if (j == 0) ((float*)(blk + (u64)layers * 2 * block_size * kvw))[row * kv_heads + head] = sc;
            continue;
        }
        bf16* dst = cache + (u64)(slot / block_size) * block_elems +
                    ((u64)(layer * 2 + kv) * block_size + slot % block_size) * kvw + (u64)head * hd;
        dst[a] = f2bf(x1);
        dst[b] = f2bf(x2);
    }
}

// ---------------------------------------------------------------------------------------------
// Decode attention over the paged cache: one query token per sequence, grouped-query heads,
// split along the context (flash-decoding). Block (seq, kv head, split) handles every query head
// of its group over `split` tokens, leaving unnormalised partial outputs and (max, sum) pairs for
// `attn_combine`.
//
// Lanes work in groups of HD/8, each lane holding 8 consecutive dims (one 16-byte load of K or V).

#define DEC_WARPS 4
#define DEC_MAX_SPLIT 512
#define DEC_UNROLL 8

// Eight E4M3 bytes as their values (times the row scale applied by the caller).
__device__ __forceinline__ void kv8_unpack8(uint2 w, float* f) {
    fp8x4_widen(w.x, f);
    fp8x4_widen(w.y, f + 4);
#pragma unroll
    for (int i = 0; i < 8; i++) f[i] *= FP8_UNBIAS;
}

template <int HD, int GROUP, bool F8>
__device__ void decode_attention_impl(const bf16* qkv, int q_stride, const bf16* cache, const int* block_tables,
                                      int max_blocks, const int* ctx_lens, float* part_o, float* part_ml, int layer,
                                      int layers, int heads, int kv_heads, int block_size, int split, int max_splits,
                                      float scale) {
    pdl_wait();
    pdl_trigger();
    constexpr int TG = HD / 8;            // lanes per token
    constexpr int TPW = 32 / TG;          // tokens per warp pass
    __shared__ float scores[GROUP * DEC_MAX_SPLIT];
    __shared__ float red[DEC_WARPS * GROUP * HD];
    __shared__ float stat[2 * GROUP];
    __shared__ u64 row_at[DEC_MAX_SPLIT];   // element (FP8: byte) offset of each token's K row
    __shared__ float ksc[F8 ? DEC_MAX_SPLIT : 1], vsc[F8 ? DEC_MAX_SPLIT : 1];   // FP8 row scales
    const unsigned char* cache8 = (const unsigned char*)cache;

    const int kvh = blockIdx.x, b = blockIdx.y, s = blockIdx.z;
    constexpr int group = GROUP;
    const int ctx = ctx_lens[b];
    const int start = s * split;
    const int end = min(ctx, start + split);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int sub = lane / TG, li = lane % TG;   // token slot within the warp, lane within group
    const u64 part = ((u64)b * heads + (u64)kvh * group) * max_splits + s;   // head g adds g*max_splits

    if (start >= end) {
        if (threadIdx.x < group) {
            u64 p = part + (u64)threadIdx.x * max_splits;
            part_ml[2 * p] = NEG_INF;
            part_ml[2 * p + 1] = 0.f;
        }
        return;
    }
    const int n = end - start;
    const int kvw = kv_heads * HD;
    const u64 block_elems = F8 ? kv8_block_bytes(layers, block_size, kv_heads, HD) : (u64)layers * 2 * block_size * kvw;
    const int* table = block_tables + (u64)b * max_blocks;
    // Resolve the block table once: every K/V address below is then one shared-memory read away.
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        int tok = start + i;
        const u64 blk = (u64)table[tok / block_size] * block_elems, row = (u64)(layer * 2) * block_size + tok % block_size;
        row_at[i] = blk + row * kvw + (u64)kvh * HD;
        if (F8) {
            const float* sc = (const float*)(cache8 + blk + (u64)layers * 2 * block_size * kvw) + row * kv_heads + kvh;
            ksc[i] = sc[0];
            vsc[i] = sc[(u64)block_size * kv_heads];
        }
    }
    __syncthreads();

    float q[GROUP][8];
#pragma unroll
    for (int g = 0; g < GROUP; g++) {
        if (g < group) {
            uint4 raw = *(const uint4*)(qkv + (u64)b * q_stride + (u64)(kvh * group + g) * HD + li * 8);
            unpack8(raw, q[g]);
#pragma unroll
            for (int i = 0; i < 8; i++) q[g][i] *= scale;
        }
    }

    // Scores. Each lane keeps DEC_UNROLL loads in flight; loop bounds are uniform across the
    // warp (the shuffles need every lane).
    constexpr int STRIDE = DEC_WARPS * TPW;
    for (int base = warp * TPW; base < n; base += STRIDE * DEC_UNROLL) {
        float kf[DEC_UNROLL][8];
#pragma unroll
        for (int u = 0; u < DEC_UNROLL; u++) {
            const int i = base + u * STRIDE + sub;
            if (i < n) {
                if (F8) kv8_unpack8(*(const uint2*)(cache8 + row_at[i] + li * 8), kf[u]);
                else unpack8(*(const uint4*)(cache + row_at[i] + li * 8), kf[u]);
            } else {
#pragma unroll
                for (int j = 0; j < 8; j++) kf[u][j] = 0.f;
            }
        }
#pragma unroll
        for (int u = 0; u < DEC_UNROLL; u++) {
            const int i = base + u * STRIDE + sub;
#pragma unroll
            for (int g = 0; g < GROUP; g++) {
                if (g < group) {
                    float d = 0.f;
#pragma unroll
                    for (int j = 0; j < 8; j++) d += q[g][j] * kf[u][j];
#pragma unroll
                    for (int o = TG / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
                    if (i < n && li == 0) scores[g * DEC_MAX_SPLIT + i] = F8 ? d * ksc[i] : d;
                }
            }
        }
    }
    __syncthreads();

    // Softmax statistics per head, one warp per head.
    for (int g = warp; g < group; g += DEC_WARPS) {
        float m = NEG_INF;
        for (int i = lane; i < n; i += 32) m = fmaxf(m, scores[g * DEC_MAX_SPLIT + i]);
        m = warp_max(m);
        float l = 0.f;
        for (int i = lane; i < n; i += 32) {
            float p = __expf(scores[g * DEC_MAX_SPLIT + i] - m);
            scores[g * DEC_MAX_SPLIT + i] = p;
            l += p;
        }
        l = warp_sum(l);
        if (lane == 0) {
            stat[2 * g] = m;
            stat[2 * g + 1] = l;
        }
    }
    __syncthreads();

    // Weighted values.
    float acc[GROUP][8];
#pragma unroll
    for (int g = 0; g < GROUP; g++)
#pragma unroll
        for (int j = 0; j < 8; j++) acc[g][j] = 0.f;
    for (int base = warp * TPW; base < n; base += STRIDE * DEC_UNROLL) {
        float vf[DEC_UNROLL][8];
#pragma unroll
        for (int u = 0; u < DEC_UNROLL; u++) {
            const int i = base + u * STRIDE + sub;
            if (i < n) {
                if (F8) kv8_unpack8(*(const uint2*)(cache8 + row_at[i] + (u64)block_size * kvw + li * 8), vf[u]);
                else unpack8(*(const uint4*)(cache + row_at[i] + (u64)block_size * kvw + li * 8), vf[u]);
            }
        }
#pragma unroll
        for (int u = 0; u < DEC_UNROLL; u++) {
            const int i = base + u * STRIDE + sub;
            if (i < n) {
                const float vs = F8 ? vsc[i] : 1.f;
#pragma unroll
                for (int g = 0; g < GROUP; g++) {
                    if (g < group) {
                        float p = scores[g * DEC_MAX_SPLIT + i] * vs;
#pragma unroll
                        for (int j = 0; j < 8; j++) acc[g][j] += p * vf[u][j];
                    }
                }
            }
        }
    }
    // Reduce the token slots of each warp, then the warps.
#pragma unroll
    for (int g = 0; g < GROUP; g++) {
        if (g < group) {
#pragma unroll
            for (int j = 0; j < 8; j++) {
                float a = acc[g][j];
#pragma unroll
                for (int o = TG; o < 32; o <<= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
                acc[g][j] = a;
            }
        }
    }
    if (sub == 0) {
#pragma unroll
        for (int g = 0; g < GROUP; g++)
            if (g < group)
#pragma unroll
                for (int j = 0; j < 8; j++) red[(warp * GROUP + g) * HD + li * 8 + j] = acc[g][j];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < group * HD; i += blockDim.x) {
        int g = i / HD, d = i % HD;
        float o = 0.f;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; w++) o += red[(w * GROUP + g) * HD + d];
        u64 p = part + (u64)g * max_splits;
        part_o[p * HD + d] = o;
        if (d == 0) {
            part_ml[2 * p] = stat[2 * g];
            part_ml[2 * p + 1] = stat[2 * g + 1];
        }
    }
}

#define DECODE_AS(NAME, HD, G, F8)                                                                        \
    extern "C" __global__ void __launch_bounds__(DEC_WARPS * 32) NAME(                                        \
        const bf16* qkv, int q_stride, const bf16* cache, const int* block_tables, int max_blocks,            \
        const int* ctx_lens, float* part_o, float* part_ml, int layer, int layers, int heads, int kv_heads,   \
        int block_size, int split, int max_splits, float scale) {                                             \
        decode_attention_impl<HD, G, F8>(qkv, q_stride, cache, block_tables, max_blocks, ctx_lens, part_o,    \
                                         part_ml, layer, layers, heads, kv_heads, block_size, split,          \
                                         max_splits, scale);                                                  \
    }
#define DECODE(HD, G)                                                                                     \
    DECODE_AS(decode_attention_##HD##_##G, HD, G, false) DECODE_AS(decode_attention_f8_##HD##_##G, HD, G, true)
#define DECODE_GROUPS(HD) DECODE(HD, 1) DECODE(HD, 2) DECODE(HD, 3) DECODE(HD, 4) DECODE(HD, 5) DECODE(HD, 6) DECODE(HD, 7) DECODE(HD, 8)
DECODE_GROUPS(64)
DECODE_GROUPS(128)

// Merges the splits of each (sequence, head) into bf16 output rows of width heads*hd.
// Grid (seqs, heads), hd threads. A sequence with no context (padding) gets zeros.
extern "C" __global__ void attn_combine(const float* part_o, const float* part_ml, const int* ctx_lens, bf16* out,
                                        int heads, int hd, int split, int max_splits) {
    pdl_wait();
    pdl_trigger();
    const int b = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
    const int used = (ctx_lens[b] + split - 1) / split;
    const u64 base = ((u64)b * heads + h) * max_splits;
    float m = NEG_INF;
    for (int s = 0; s < used; s++) m = fmaxf(m, part_ml[2 * (base + s)]);
    float num = 0.f, den = 0.f;
    for (int s = 0; s < used; s++) {
        float w = __expf(part_ml[2 * (base + s)] - m);
        den += w * part_ml[2 * (base + s) + 1];
        num += w * part_o[(base + s) * hd + d];
    }
    out[((u64)b * heads + h) * hd + d] = f2bf(used > 0 && den > 0.f ? num / den : 0.f);
}

// ---------------------------------------------------------------------------------------------
// Causal attention for prefill chunks over the paged cache, flash-style: a block takes 64 query
// rows of one sequence and one head (16 rows a warp), walks the keys 64 at a time through shared
// memory, and keeps a running max and sum per row, so the score matrix never exists in memory.
// Tensor cores via mma.sync m16n8k16 (bf16 operands, f32 accumulators).
//
// tiles[2*i] = sequence index, tiles[2*i+1] = first query row of the tile within the sequence's
// new tokens. q_start[s] = row of the sequence's first new token in qkv; q_len[s] = its new
// tokens; ctx_lens[s] = tokens in the cache after this step (new ones included), so new token i
// sits at position ctx - q_len + i and sees keys 0..=that position.

#define PF_BM 64
#define PF_BN 64
#define PF_WARPS 4

__device__ __forceinline__ void mma_bf16(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <int HD, bool F8>
__device__ void prefill_attention_impl(const bf16* qkv, int q_stride, const bf16* cache, const int* block_tables,
                                       int max_blocks, const int* tiles, const int* q_start, const int* q_len,
                                       const int* ctx_lens, bf16* out, int out_stride, int layer, int layers,
                                       int heads, int kv_heads, int block_size, float scale) {
    constexpr int KP = HD + 8;       // padded row of K in shared memory (bf16)
    constexpr int VP = PF_BN + 8;    // padded row of transposed V
    __shared__ __align__(16) bf16 ks[PF_BN * KP];
    __shared__ __align__(16) bf16 vt[HD * VP];

    const int seq = tiles[2 * blockIdx.x], tile_q = tiles[2 * blockIdx.x + 1];
    const int h = blockIdx.y, kvh = h / (heads / kv_heads);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gid = lane >> 2, tid = lane & 3;
    const int nq = q_len[seq], ctx = ctx_lens[seq];
    const int first_pos = ctx - nq;
    const int kvw = kv_heads * HD;
    const u64 block_elems = (u64)layers * 2 * block_size * kvw;
    const int* table = block_tables + (u64)seq * max_blocks;

    // This thread's two rows (gid and gid + 8 of the warp's 16).
    const int r0 = tile_q + warp * 16 + gid, r1 = r0 + 8;
    const bool v0 = r0 < nq, v1 = r1 < nq;
    const int p0 = first_pos + r0, p1 = first_pos + r1;

    // Q fragments for the warp's 16 rows, all of HD.
    u32 qa[HD / 16][4];
    {
        const bf16* q0 = qkv + (u64)(q_start[seq] + (v0 ? r0 : 0)) * q_stride + (u64)h * HD;
        const bf16* q1 = qkv + (u64)(q_start[seq] + (v1 ? r1 : 0)) * q_stride + (u64)h * HD;
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            int c = kk * 16 + tid * 2;
            qa[kk][0] = v0 ? *(const u32*)(q0 + c) : 0u;
            qa[kk][1] = v1 ? *(const u32*)(q1 + c) : 0u;
            qa[kk][2] = v0 ? *(const u32*)(q0 + c + 8) : 0u;
            qa[kk][3] = v1 ? *(const u32*)(q1 + c + 8) : 0u;
        }
    }

    float o[HD / 8][4];
#pragma unroll
    for (int i = 0; i < HD / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;
    const float sl2 = scale * LOG2E;

    const int last_row = min(nq, tile_q + PF_BM) - 1;
    const int kv_end = min(ctx, first_pos + last_row + 1);
    for (int kb = 0; kb < kv_end; kb += PF_BN) {
        __syncthreads();
        // Stage K (row-major) and V (transposed) for keys kb..kb+63; keys past the end are zeros.
        for (int c = threadIdx.x; c < PF_BN * (HD / 8); c += blockDim.x) {
            int j = c / (HD / 8), part = c % (HD / 8);
            int key = kb + j;
            uint4 kv4 = make_uint4(0, 0, 0, 0), vv4 = make_uint4(0, 0, 0, 0);
            if (key < kv_end && F8) {
                const unsigned char* blk = (const unsigned char*)cache +
                                           (u64)table[key / block_size] * kv8_block_bytes(layers, block_size, kv_heads, HD);
                const u64 row = (u64)(layer * 2) * block_size + key % block_size;
                const unsigned char* src = blk + row * kvw + (u64)kvh * HD + part * 8;
                const float* sc = (const float*)(blk + (u64)layers * 2 * block_size * kvw) + row * kv_heads + kvh;
                kv4 = kv8_widen8(*(const uint2*)src, sc[0]);
                vv4 = kv8_widen8(*(const uint2*)(src + (u64)block_size * kvw), sc[(u64)block_size * kv_heads]);
            } else if (key < kv_end) {
                u64 blk = (u64)table[key / block_size];
                u64 off = ((u64)(layer * 2) * block_size + key % block_size) * kvw + (u64)kvh * HD + part * 8;
                kv4 = *(const uint4*)(cache + blk * block_elems + off);
                vv4 = *(const uint4*)(cache + blk * block_elems + off + (u64)block_size * kvw);
            }
            *(uint4*)(ks + j * KP + part * 8) = kv4;
            const bf16* vp = (const bf16*)&vv4;
#pragma unroll
            for (int e = 0; e < 8; e++) vt[(part * 8 + e) * VP + j] = vp[e];
        }
        __syncthreads();

        // S = Q K^T for the warp's 16 rows × 64 keys.
        float s[PF_BN / 8][4];
#pragma unroll
        for (int nt = 0; nt < PF_BN / 8; nt++) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < HD / 16; kk++) {
                const bf16* kr = ks + (nt * 8 + gid) * KP + kk * 16 + tid * 2;
                mma_bf16(s[nt], qa[kk], *(const u32*)kr, *(const u32*)(kr + 8));
            }
        }
        // Mask, scale into log2 units, running max.
        float mx0 = m0, mx1 = m1;
#pragma unroll
        for (int nt = 0; nt < PF_BN / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int key = kb + nt * 8 + tid * 2 + (e & 1);
                bool row1 = e >= 2;
                bool ok = row1 ? (v1 && key <= p1) : (v0 && key <= p0);
                float val = ok ? s[nt][e] * sl2 : NEG_INF;
                s[nt][e] = val;
                if (row1) mx1 = fmaxf(mx1, val); else mx0 = fmaxf(mx0, val);
            }
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float b0 = mx0 == NEG_INF ? 0.f : mx0, b1 = mx1 == NEG_INF ? 0.f : mx1;
        const float c0 = exp2f((m0 == NEG_INF ? b0 : m0) - b0), c1 = exp2f((m1 == NEG_INF ? b1 : m1) - b1);
        m0 = mx0;
        m1 = mx1;
        l0 *= c0;
        l1 *= c1;
#pragma unroll
        for (int i = 0; i < HD / 8; i++) {
            o[i][0] *= c0; o[i][1] *= c0;
            o[i][2] *= c1; o[i][3] *= c1;
        }
#pragma unroll
        for (int nt = 0; nt < PF_BN / 8; nt++) {
            s[nt][0] = exp2f(s[nt][0] - b0);
            s[nt][1] = exp2f(s[nt][1] - b0);
            s[nt][2] = exp2f(s[nt][2] - b1);
            s[nt][3] = exp2f(s[nt][3] - b1);
            l0 += s[nt][0] + s[nt][1];
            l1 += s[nt][2] + s[nt][3];
        }
        // O += P V.
#pragma unroll
        for (int kk = 0; kk < PF_BN / 16; kk++) {
            u32 pa[4];
            pa[0] = pack_bf2(s[2 * kk][0], s[2 * kk][1]);
            pa[1] = pack_bf2(s[2 * kk][2], s[2 * kk][3]);
            pa[2] = pack_bf2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pa[3] = pack_bf2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int dt = 0; dt < HD / 8; dt++) {
                const bf16* vr = vt + (dt * 8 + gid) * VP + kk * 16 + tid * 2;
                mma_bf16(o[dt], pa, *(const u32*)vr, *(const u32*)(vr + 8));
            }
        }
    }
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float i0 = l0 > 0.f ? 1.f / l0 : 0.f, i1 = l1 > 0.f ? 1.f / l1 : 0.f;
    bf16* o0 = out + (u64)(q_start[seq] + r0) * out_stride + (u64)h * HD;
    bf16* o1 = out + (u64)(q_start[seq] + r1) * out_stride + (u64)h * HD;
#pragma unroll
    for (int dt = 0; dt < HD / 8; dt++) {
        int c = dt * 8 + tid * 2;
        if (v0) *(u32*)(o0 + c) = pack_bf2(o[dt][0] * i0, o[dt][1] * i0);
        if (v1) *(u32*)(o1 + c) = pack_bf2(o[dt][2] * i1, o[dt][3] * i1);
    }
}

#define PREFILL_STAGED(NAME, HD, F8)                                                                         \
    extern "C" __global__ void __launch_bounds__(PF_WARPS * 32) NAME(                                         \
        const bf16* qkv, int q_stride, const bf16* cache, const int* block_tables, int max_blocks,            \
        const int* tiles, const int* q_start, const int* q_len, const int* ctx_lens, bf16* out, int out_stride, \
        int layer, int layers, int heads, int kv_heads, int block_size, float scale) {                        \
        prefill_attention_impl<HD, F8>(qkv, q_stride, cache, block_tables, max_blocks, tiles, q_start, q_len,  \
                                       ctx_lens, out, out_stride, layer, layers, heads, kv_heads, block_size,  \
                                       scale);                                                                \
    }
PREFILL_STAGED(prefill_attention_64, 64, false)
PREFILL_STAGED(prefill_attention_128, 128, false)
PREFILL_STAGED(prefill_attention_f8_64, 64, true)
PREFILL_STAGED(prefill_attention_f8_128, 128, true)

// ---------------------------------------------------------------------------------------------
// Prefill attention, pipelined: the tiling and arithmetic of the kernel above (64 query rows of
// one head a block, 16 a warp, keys 64 at a time, running max and sum), with
// - K and V tiles copied into shared memory by cp.async, two tiles deep: tile t+1 is in flight
//   while tile t is multiplied, so the copy path and the tensor cores overlap;
// - the mma operands read by ldmatrix, four 8×8 fragments an instruction, V transposed on the way
//   by ldmatrix.trans (rows stay as the cache holds them; no scalar transposing stores);
// - the causal mask applied only on the key tiles that cross a warp's diagonal, and a warp whose
//   rows see none of a tile's keys skipping it;
// - the heaviest tiles first: the grid is (heads, tiles) and tiles run from the last one back,
//   so the long causal rows start early and the short ones fill the tail, and the query heads that
//   share a KV head run side by side (their K/V reads meet in L2).
// Dynamic shared memory: 2 stages × (K, V) × 64 rows × (HD + 8) bf16 (69,632 bytes at HD 128).

__device__ __forceinline__ u32 smem_u32(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// 16 bytes global → shared, bypassing L1; `valid` false writes zeros and reads nothing.
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

// 2^x on the special-function unit (relative error about 2^-22; 2^-inf = 0).
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Two floats to a bf16 pair, round to nearest even, in one instruction (lo in the low half).
__device__ __forceinline__ u32 cvt_bf2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}


// The f16 forms of the tensor-core product and of the packing, for the FP8 cache's decode
// (E4M3 widens to f16 exactly, in one instruction a pair).
__device__ __forceinline__ void mma_f16(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <bool F16>
__device__ __forceinline__ void mma_kv(float* c, const u32* a, u32 b0, u32 b1) {
    if (F16) mma_f16(c, a, b0, b1);
    else mma_bf16(c, a, b0, b1);
}
__device__ __forceinline__ u32 cvt_h2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
// Four E4M3 bytes (the lowest first) as two f16 pairs, exactly. From sm_89 one conversion
// instruction a pair; before it (sm_80, sm_86) the bits are moved: s eeee mmm lands as the f16
// s 0eeee mmm0000000, the byte's value times 2^-8 (biases 7 and 15; subnormals alike), and one
// multiply by 256 restores it.
__device__ __forceinline__ void e4m3x4_to_h2(u32 w, u32& lo, u32& hi) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 890
    asm("{ .reg .b16 a, b; mov.b32 {a, b}, %2; cvt.rn.f16x2.e4m3x2 %0, a; cvt.rn.f16x2.e4m3x2 %1, b; }"
        : "=r"(lo), "=r"(hi)
        : "r"(w));
#else
    const u32 a = ((w & 0x80u) << 8) | ((w & 0x7fu) << 7) | ((w & 0x8000u) << 16) | ((w & 0x7f00u) << 15);
    const u32 h = w >> 16;
    const u32 b = ((h & 0x80u) << 8) | ((h & 0x7fu) << 7) | ((h & 0x8000u) << 16) | ((h & 0x7f00u) << 15);
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(lo) : "r"(a), "r"(0x5c005c00u));
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(hi) : "r"(b), "r"(0x5c005c00u));
#endif
}

// 4 bytes global → shared through L1; `valid` false writes zeros and reads nothing.
__device__ __forceinline__ void cp_async4(u32 dst, const void* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(dst), "l"(src), "r"(valid ? 4 : 0) : "memory");
}

// Raw stages the decode kernel keeps in flight on an FP8 cache: its tiles carry half the bytes of
// bf16 ones, so it takes twice the depth (two blocks a multiprocessor, four stages each).
#define DEC8_DEPTH 4

// The FP8 cache through the cp.async kernels. A key tile's E4M3 rows are copied by cp.async into
// a raw stage (64 K rows then 64 V rows of HD bytes), two stages deep as the bf16 tiles are, and
// each thread copies the scales of its own chunks beside them into slots of its own. Once its
// copies have landed a thread widens its chunks into the one bf16 stage the tensor-core loop
// reads (the barrier after tile t - 1's products frees it): no thread reads what another
// copied, so the widening needs no barrier of its own. A thread owns the 16-byte chunks
// c = threadIdx.x + 128 i of K and of V.
template <int HD>
struct Kv8Tile {
    static constexpr int CH = HD / 16;                         // 16-byte chunks of a row
    static constexpr int PER = PF_BN * CH / (PF_WARPS * 32);   // a thread's chunks of K (and of V)
    static constexpr int ROWS = 2 * PF_BN * HD;                // bytes of a stage's rows
    static constexpr int RAW = ROWS + PF_WARPS * 32 * 2 * PER * 4;   // rows, then every thread's scales

    // Queues keys first..first+63 (those at or past `end`: zeros) into stage `raw`; one group.
    static __device__ __forceinline__ void fetch(const bf16* cache, const int* table, int first, int end, int layer,
                                                 int layers, int kv_heads, int kvh, int block_size, unsigned char* raw) {
        const u64 kvw = (u64)kv_heads * HD;
        const u64 bb = kv8_block_bytes(layers, block_size, kv_heads, HD);
        const u64 scales = (u64)layers * 2 * block_size * kvw;
        float* slots = (float*)(raw + ROWS) + threadIdx.x * 2 * PER;
#pragma unroll
        for (int i = 0; i < PER; i++) {
            const int c = threadIdx.x + i * PF_WARPS * 32;
            const int j = c / CH, part = c % CH;
            const int key = first + j;
            const bool ok = key < end;
            const unsigned char* src = (const unsigned char*)cache;
            const float* sc = (const float*)cache;
            if (ok) {
                const unsigned char* blk = src + (u64)table[key / block_size] * bb;
                const u64 row = (u64)(layer * 2) * block_size + key % block_size;
                src = blk + row * kvw + (u64)kvh * HD + part * 16;
                sc = (const float*)(blk + scales) + row * kv_heads + kvh;
            }
            cp_async16(smem_u32(raw + j * HD + part * 16), src, ok);
            cp_async16(smem_u32(raw + (PF_BN + j) * HD + part * 16), ok ? src + (u64)block_size * kvw : src, ok);
            cp_async4(smem_u32(slots + 2 * i), sc, ok);
            cp_async4(smem_u32(slots + 2 * i + 1), ok ? sc + (u64)block_size * kv_heads : sc, ok);
        }
        cp_async_commit();
    }

    // This thread's chunks of stage `raw` (its copies landed) into K and V rows of `RP` bf16 at `ks`.
    template <int RP>
    static __device__ __forceinline__ void widen(const unsigned char* raw, bf16* ks) {
        const float* slots = (const float*)(raw + ROWS) + threadIdx.x * 2 * PER;
#pragma unroll
        for (int i = 0; i < PER; i++) {
            const int c = threadIdx.x + i * PF_WARPS * 32;
            const int j = c / CH, part = c % CH;
            widen16(*(const uint4*)(raw + j * HD + part * 16), slots[2 * i], ks + j * RP + part * 16);
            widen16(*(const uint4*)(raw + (PF_BN + j) * HD + part * 16), slots[2 * i + 1], ks + (PF_BN + j) * RP + part * 16);
        }
    }

    // The decode kernel's form, DEC8_DEPTH stages deep: a stage is the tile's rows, then its 64 K
    // and 64 V row scales, copied by the thread that owns each row's first chunk and read by
    // every warp after the barrier (the rows widen to f16 exactly, without their scales).
    static constexpr int RAW_H = ROWS + 2 * PF_BN * 4;
    static __device__ __forceinline__ void fetch_h(const bf16* cache, const int* table, int first, int end, int layer,
                                                   int layers, int kv_heads, int kvh, int block_size, unsigned char* raw) {
        const u64 kvw = (u64)kv_heads * HD;
        const u64 bb = kv8_block_bytes(layers, block_size, kv_heads, HD);
        const u64 scales = (u64)layers * 2 * block_size * kvw;
        float* sc = (float*)(raw + ROWS);
#pragma unroll
        for (int i = 0; i < PER; i++) {
            const int c = threadIdx.x + i * PF_WARPS * 32;
            const int j = c / CH, part = c % CH;
            const int key = first + j;
            const bool ok = key < end;
            const unsigned char* src = (const unsigned char*)cache;
            const float* ss = (const float*)cache;
            if (ok) {
                const unsigned char* blk = src + (u64)table[key / block_size] * bb;
                const u64 row = (u64)(layer * 2) * block_size + key % block_size;
                src = blk + row * kvw + (u64)kvh * HD + part * 16;
                ss = (const float*)(blk + scales) + row * kv_heads + kvh;
            }
            cp_async16(smem_u32(raw + j * HD + part * 16), src, ok);
            cp_async16(smem_u32(raw + (PF_BN + j) * HD + part * 16), ok ? src + (u64)block_size * kvw : src, ok);
            if (part == 0) {
                cp_async4(smem_u32(sc + j), ss, ok);
                cp_async4(smem_u32(sc + PF_BN + j), ok ? ss + (u64)block_size * kv_heads : ss, ok);
            }
        }
        cp_async_commit();
    }

    // This thread's chunks of stage `raw` (its copies landed) into K and V rows of `RP` f16 at `ks`.
    template <int RP>
    static __device__ __forceinline__ void widen_h(const unsigned char* raw, bf16* ks) {
#pragma unroll
        for (int i = 0; i < PER; i++) {
            const int c = threadIdx.x + i * PF_WARPS * 32;
            const int j = c / CH, part = c % CH;
#pragma unroll
            for (int kv = 0; kv < 2; kv++) {
                const uint4 w = *(const uint4*)(raw + (kv * PF_BN + j) * HD + part * 16);
                uint4 a, b;
                e4m3x4_to_h2(w.x, a.x, a.y);
                e4m3x4_to_h2(w.y, a.z, a.w);
                e4m3x4_to_h2(w.z, b.x, b.y);
                e4m3x4_to_h2(w.w, b.z, b.w);
                bf16* dst = ks + (kv * PF_BN + j) * RP + part * 16;
                *(uint4*)dst = a;
                *(uint4*)(dst + 8) = b;
            }
        }
    }

    // Sixteen E4M3 bytes times `scale` into sixteen bf16 at dst (scales stay below 2^8, so the
    // product with 2^120 is finite).
    static __device__ __forceinline__ void widen16(uint4 w, float scale, bf16* dst) {
        const float s = scale * FP8_UNBIAS;
        const u32 in[4] = {w.x, w.y, w.z, w.w};
        u32 out[8];
#pragma unroll
        for (int q = 0; q < 4; q++) {
            float f[4];
            fp8x4_widen(in[q], f);
            out[2 * q] = cvt_bf2(f[0] * s, f[1] * s);
            out[2 * q + 1] = cvt_bf2(f[2] * s, f[3] * s);
        }
        *(uint4*)dst = make_uint4(out[0], out[1], out[2], out[3]);
        *(uint4*)(dst + 8) = make_uint4(out[4], out[5], out[6], out[7]);
    }
};

template <int HD, bool F8>
__device__ void prefill_attention_pipelined_impl(const bf16* qkv, int q_stride, const bf16* cache,
                                                 const int* block_tables, int max_blocks, const int* tiles,
                                                 const int* q_start, const int* q_len, const int* ctx_lens, bf16* out,
                                                 int out_stride, int layer, int layers, int heads, int kv_heads,
                                                 int block_size, float scale) {
    constexpr int RP = HD + 8;                 // padded shared row (bf16): ldmatrix rows 4 banks apart
    constexpr int CH = HD / 8;                 // 16-byte chunks a row
    constexpr int STAGE = 2 * PF_BN * RP;      // one stage: K rows then V rows
    extern __shared__ __align__(16) bf16 pf_smem[];
    // FP8: one bf16 stage, then the two raw stages (Kv8Tile).
    unsigned char* raw = (unsigned char*)(pf_smem + (F8 ? 1 : 2) * STAGE);

    const int tile_i = gridDim.y - 1 - blockIdx.y;
    const int seq = tiles[2 * tile_i], tile_q = tiles[2 * tile_i + 1];
    const int h = blockIdx.x, kvh = h / (heads / kv_heads);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gid = lane >> 2, tid = lane & 3;
    const int nq = q_len[seq], ctx = ctx_lens[seq];
    const int first_pos = ctx - nq;
    const int kvw = kv_heads * HD;
    const u64 block_elems = (u64)layers * 2 * block_size * kvw;
    const int* table = block_tables + (u64)seq * max_blocks;

    const int last_row = min(nq, tile_q + PF_BM) - 1;
    const int kv_end = min(ctx, first_pos + last_row + 1);
    const int n_kt = (kv_end + PF_BN - 1) / PF_BN;

    // Queue the copy of key tile t into stage t & 1 (keys past kv_end are zero-filled).
    auto load_tile = [&](int t) {
        if (F8) {
            Kv8Tile<HD>::fetch(cache, table, t * PF_BN, kv_end, layer, layers, kv_heads, kvh, block_size, raw + (t & 1) * Kv8Tile<HD>::RAW);
            return;
        }
        bf16* ks = pf_smem + (t & 1) * STAGE;
        bf16* vs = ks + PF_BN * RP;
        for (int c = threadIdx.x; c < PF_BN * CH; c += PF_WARPS * 32) {
            const int j = c / CH, part = c % CH;
            const int key = t * PF_BN + j;
            const bool ok = key < kv_end;
            const bf16* src = cache;
            if (ok) {
                src = cache + (u64)table[key / block_size] * block_elems +
                      ((u64)(layer * 2) * block_size + key % block_size) * kvw + (u64)kvh * HD + part * 8;
            }
            cp_async16(smem_u32(ks + j * RP + part * 8), src, ok);
            cp_async16(smem_u32(vs + j * RP + part * 8), ok ? src + (u64)block_size * kvw : cache, ok);
        }
        cp_async_commit();
    };
    if (n_kt > 0) load_tile(0);

    // This thread's two rows (gid and gid + 8 of the warp's 16).
    const int r0 = tile_q + warp * 16 + gid, r1 = r0 + 8;
    const bool v0 = r0 < nq, v1 = r1 < nq;
    const int p0 = first_pos + r0, p1 = first_pos + r1;
    // Positions of the warp's first and last rows: tiles wholly at or below the first need no
    // mask; tiles wholly past the last are skipped.
    const int warp_lo = first_pos + tile_q + warp * 16, warp_hi = warp_lo + 15;
    const bool warp_live = tile_q + warp * 16 < nq;

    u32 qa[HD / 16][4];
    {
        const bf16* q0 = qkv + (u64)(q_start[seq] + (v0 ? r0 : 0)) * q_stride + (u64)h * HD;
        const bf16* q1 = qkv + (u64)(q_start[seq] + (v1 ? r1 : 0)) * q_stride + (u64)h * HD;
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            int c = kk * 16 + tid * 2;
            qa[kk][0] = v0 ? *(const u32*)(q0 + c) : 0u;
            qa[kk][1] = v1 ? *(const u32*)(q1 + c) : 0u;
            qa[kk][2] = v0 ? *(const u32*)(q0 + c + 8) : 0u;
            qa[kk][3] = v1 ? *(const u32*)(q1 + c + 8) : 0u;
        }
    }

    float o[HD / 8][4];
#pragma unroll
    for (int i = 0; i < HD / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;
    const float sl2 = scale * LOG2E;

    // ldmatrix lane addresses (bytes from a stage's K or V rows). K, plain: lanes 8i..8i+7 give
    // the rows of fragment i, columns 8i: fragments (b0, b1) of k-step kk and of kk + 1. V,
    // transposed: fragment i covers keys +8·(i&1) and dims +8·(i>>1): (b0, b1) of dims dt, dt+1.
    const u32 k_lane = (u32)(((lane & 7) * RP + (lane >> 3) * 8) * 2);
    const u32 v_lane = (u32)((((lane & 7) + ((lane >> 3) & 1) * 8) * RP + (lane >> 4) * 8) * 2);

    for (int t = 0; t < n_kt; t++) {
        if (t + 1 < n_kt) {
            load_tile(t + 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        if (F8) Kv8Tile<HD>::template widen<RP>(raw + (t & 1) * Kv8Tile<HD>::RAW, pf_smem);
        __syncthreads();
        const int kb = t * PF_BN;
        if (warp_live && kb <= warp_hi) {
            const u32 kbase = smem_u32(pf_smem + (F8 ? 0 : t & 1) * STAGE);
            const u32 vbase = kbase + PF_BN * RP * 2;

            // S = Q K^T for the warp's 16 rows × 64 keys.
            float s[PF_BN / 8][4];
#pragma unroll
            for (int nt = 0; nt < PF_BN / 8; nt++) {
                s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
                for (int kk = 0; kk < HD / 16; kk += 2) {
                    u32 b0, b1, b2, b3;
                    ldsm_x4(kbase + (u32)((nt * 8 * RP + kk * 16) * 2) + k_lane, b0, b1, b2, b3);
                    mma_bf16(s[nt], qa[kk], b0, b1);
                    mma_bf16(s[nt], qa[kk + 1], b2, b3);
                }
            }
            // Scale into log2 units; mask only where the tile crosses the warp's diagonal.
            float mx0 = m0, mx1 = m1;
            if (kb + PF_BN - 1 > warp_lo) {
#pragma unroll
                for (int nt = 0; nt < PF_BN / 8; nt++) {
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int key = kb + nt * 8 + tid * 2 + (e & 1);
                        const bool row1 = e >= 2;
                        const bool ok = row1 ? (v1 && key <= p1) : (v0 && key <= p0);
                        s[nt][e] = ok ? s[nt][e] * sl2 : NEG_INF;
                    }
                }
            } else {
#pragma unroll
                for (int nt = 0; nt < PF_BN / 8; nt++)
#pragma unroll
                    for (int e = 0; e < 4; e++) s[nt][e] *= sl2;
            }
#pragma unroll
            for (int nt = 0; nt < PF_BN / 8; nt++) {
                mx0 = fmaxf(mx0, fmaxf(s[nt][0], s[nt][1]));
                mx1 = fmaxf(mx1, fmaxf(s[nt][2], s[nt][3]));
            }
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
            const float b0 = mx0 == NEG_INF ? 0.f : mx0, b1 = mx1 == NEG_INF ? 0.f : mx1;
            const float c0 = ex2((m0 == NEG_INF ? b0 : m0) - b0), c1 = ex2((m1 == NEG_INF ? b1 : m1) - b1);
            m0 = mx0;
            m1 = mx1;
            l0 *= c0;
            l1 *= c1;
#pragma unroll
            for (int i = 0; i < HD / 8; i++) {
                o[i][0] *= c0;
                o[i][1] *= c0;
                o[i][2] *= c1;
                o[i][3] *= c1;
            }
#pragma unroll
            for (int nt = 0; nt < PF_BN / 8; nt++) {
                s[nt][0] = ex2(s[nt][0] - b0);
                s[nt][1] = ex2(s[nt][1] - b0);
                s[nt][2] = ex2(s[nt][2] - b1);
                s[nt][3] = ex2(s[nt][3] - b1);
                l0 += s[nt][0] + s[nt][1];
                l1 += s[nt][2] + s[nt][3];
            }
            // O += P V.
#pragma unroll
            for (int kk = 0; kk < PF_BN / 16; kk++) {
                u32 pa[4];
                pa[0] = cvt_bf2(s[2 * kk][0], s[2 * kk][1]);
                pa[1] = cvt_bf2(s[2 * kk][2], s[2 * kk][3]);
                pa[2] = cvt_bf2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
                pa[3] = cvt_bf2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
                for (int dt = 0; dt < HD / 8; dt += 2) {
                    u32 b0v, b1v, b2v, b3v;
                    ldsm_x4_t(vbase + (u32)((kk * 16 * RP + dt * 8) * 2) + v_lane, b0v, b1v, b2v, b3v);
                    mma_bf16(o[dt], pa, b0v, b1v);
                    mma_bf16(o[dt + 1], pa, b2v, b3v);
                }
            }
        }
        // The stage just read is the one the next iteration's copy overwrites.
        __syncthreads();
    }
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float i0 = l0 > 0.f ? 1.f / l0 : 0.f, i1 = l1 > 0.f ? 1.f / l1 : 0.f;
    bf16* o0 = out + (u64)(q_start[seq] + r0) * out_stride + (u64)h * HD;
    bf16* o1 = out + (u64)(q_start[seq] + r1) * out_stride + (u64)h * HD;
#pragma unroll
    for (int dt = 0; dt < HD / 8; dt++) {
        int c = dt * 8 + tid * 2;
        if (v0) *(u32*)(o0 + c) = pack_bf2(o[dt][0] * i0, o[dt][1] * i0);
        if (v1) *(u32*)(o1 + c) = pack_bf2(o[dt][2] * i1, o[dt][3] * i1);
    }
}

#define PREFILL_PIPELINED_AS(NAME, HD, F8)                                                                   \
    extern "C" __global__ void __launch_bounds__(PF_WARPS * 32) NAME(                                         \
        const bf16* qkv, int q_stride, const bf16* cache, const int* block_tables, int max_blocks,            \
        const int* tiles, const int* q_start, const int* q_len, const int* ctx_lens, bf16* out, int out_stride, \
        int layer, int layers, int heads, int kv_heads, int block_size, float scale) {                        \
        prefill_attention_pipelined_impl<HD, F8>(qkv, q_stride, cache, block_tables, max_blocks, tiles,       \
                                                 q_start, q_len, ctx_lens, out, out_stride, layer, layers,    \
                                                 heads, kv_heads, block_size, scale);                         \
    }
#define PREFILL_PIPELINED(HD)                                                                                \
    PREFILL_PIPELINED_AS(prefill_attention_pipelined_##HD, HD, false)                                         \
    PREFILL_PIPELINED_AS(prefill_attention_pipelined_f8_##HD, HD, true)
PREFILL_PIPELINED(64)
PREFILL_PIPELINED(128)

// ---------------------------------------------------------------------------------------------
// Prefill attention, wide: the pipelined kernel's copy path and fragments, but 128 query rows a
// block and 32 a warp (two 16-row groups), so each K or V fragment read from shared memory feeds
// two tensor-core products instead of one (80 ldmatrix per 256 mma a key tile, against 64 per
// 128), and each warp has two independent accumulation chains in flight. Q is staged once in
// shared memory (its fragments no longer fit in registers beside 32 rows of output) and read by
// ldmatrix per key tile. The plan's tiles are 64 rows: a block takes the tile that starts an
// aligned pair (tile_q % 128 == 0) and the rows of its successor; the successor's block exits at
// once. Dynamic shared memory: (128 Q rows + 2 stages × (64 K + 64 V rows)) × (HD + 8) bf16
// (104,448 bytes at HD 128).

#define PW_BM 128

template <int HD, bool F8>
__device__ void prefill_attention_wide_impl(const bf16* qkv, int q_stride, const bf16* cache, const int* block_tables,
                                            int max_blocks, const int* tiles, const int* q_start, const int* q_len,
                                            const int* ctx_lens, bf16* out, int out_stride, int layer, int layers,
                                            int heads, int kv_heads, int block_size, float scale) {
    constexpr int RP = HD + 8;
    constexpr int CH = HD / 8;
    constexpr int STAGE = 2 * PF_BN * RP;
    extern __shared__ __align__(16) bf16 pf_smem[];
    bf16* qs = pf_smem;                      // [PW_BM][RP]
    bf16* kv_smem = pf_smem + PW_BM * RP;    // two stages of [K rows][V rows] (FP8: one, then two raw)
    unsigned char* raw = (unsigned char*)(kv_smem + (F8 ? 1 : 2) * STAGE);

    const int tile_i = gridDim.y - 1 - blockIdx.y;
    const int seq = tiles[2 * tile_i], tile_q = tiles[2 * tile_i + 1];
    if (tile_q % PW_BM != 0) return;   // the second half of a pair: its rows are the block before's
    const int h = blockIdx.x, kvh = h / (heads / kv_heads);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gid = lane >> 2, tid = lane & 3;
    const int nq = q_len[seq], ctx = ctx_lens[seq];
    const int first_pos = ctx - nq;
    const int kvw = kv_heads * HD;
    const u64 block_elems = (u64)layers * 2 * block_size * kvw;
    const int* table = block_tables + (u64)seq * max_blocks;

    const int last_row = min(nq, tile_q + PW_BM) - 1;
    const int kv_end = min(ctx, first_pos + last_row + 1);
    const int n_kt = (kv_end + PF_BN - 1) / PF_BN;

    // Q rows of the block (rows past the chunk zero-filled); committed with key tile 0.
    for (int c = threadIdx.x; c < PW_BM * CH; c += PF_WARPS * 32) {
        const int j = c / CH, part = c % CH;
        const bool ok = tile_q + j < nq;
        const bf16* src = ok ? qkv + (u64)(q_start[seq] + tile_q + j) * q_stride + (u64)h * HD + part * 8 : qkv;
        cp_async16(smem_u32(qs + j * RP + part * 8), src, ok);
    }
    auto load_tile = [&](int t) {
        if (F8) {
            Kv8Tile<HD>::fetch(cache, table, t * PF_BN, kv_end, layer, layers, kv_heads, kvh, block_size, raw + (t & 1) * Kv8Tile<HD>::RAW);
            return;
        }
        bf16* ks = kv_smem + (t & 1) * STAGE;
        bf16* vs = ks + PF_BN * RP;
        for (int c = threadIdx.x; c < PF_BN * CH; c += PF_WARPS * 32) {
            const int j = c / CH, part = c % CH;
            const int key = t * PF_BN + j;
            const bool ok = key < kv_end;
            const bf16* src = cache;
            if (ok) {
                src = cache + (u64)table[key / block_size] * block_elems +
                      ((u64)(layer * 2) * block_size + key % block_size) * kvw + (u64)kvh * HD + part * 8;
            }
            cp_async16(smem_u32(ks + j * RP + part * 8), src, ok);
            cp_async16(smem_u32(vs + j * RP + part * 8), ok ? src + (u64)block_size * kvw : cache, ok);
        }
        cp_async_commit();
    };
    if (n_kt > 0) load_tile(0);
    else cp_async_commit();

    // This thread's rows: group g (0, 1) of the warp's 32, rows gid and gid + 8 of each.
    const int wrow = tile_q + warp * 32;
    const int warp_lo = first_pos + wrow, warp_hi = warp_lo + 31;
    const bool warp_live = wrow < nq;
    // Row gid + 8i of group g sits at position warp_lo + 16g + 8i + gid; it exists while that
    // position is below ctx.
    const int pos_base = warp_lo + gid;

    float o[2][HD / 8][4];
#pragma unroll
    for (int g = 0; g < 2; g++)
#pragma unroll
        for (int i = 0; i < HD / 8; i++) o[g][i][0] = o[g][i][1] = o[g][i][2] = o[g][i][3] = 0.f;
    float m[2][2] = {{NEG_INF, NEG_INF}, {NEG_INF, NEG_INF}}, l[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
    const float sl2 = scale * LOG2E;

    // ldmatrix lane addresses: Q (A operand, x4 = rows 0-7/8-15 × cols 0-7/8-15 of a 16×16
    // block), K plain and V transposed as in the pipelined kernel.
    const u32 q_lane = smem_u32(qs) + (u32)(((warp * 32 + (lane & 15)) * RP + (lane >> 4) * 8) * 2);
    const u32 k_lane = (u32)(((lane & 7) * RP + (lane >> 3) * 8) * 2);
    const u32 v_lane = (u32)((((lane & 7) + ((lane >> 3) & 1) * 8) * RP + (lane >> 4) * 8) * 2);

    for (int t = 0; t < n_kt; t++) {
        if (t + 1 < n_kt) {
            load_tile(t + 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        if (F8) Kv8Tile<HD>::template widen<RP>(raw + (t & 1) * Kv8Tile<HD>::RAW, kv_smem);
        __syncthreads();
        const int kb = t * PF_BN;
        if (warp_live && kb <= warp_hi) {
            const u32 kbase = smem_u32(kv_smem + (F8 ? 0 : t & 1) * STAGE);
            const u32 vbase = kbase + PF_BN * RP * 2;

            float s[2][PF_BN / 8][4];
#pragma unroll
            for (int g = 0; g < 2; g++)
#pragma unroll
                for (int nt = 0; nt < PF_BN / 8; nt++) s[g][nt][0] = s[g][nt][1] = s[g][nt][2] = s[g][nt][3] = 0.f;
            // Not unrolled: the loads of one k step are all a step needs, and unrolling lets the
            // compiler hoist later steps' loads past the register budget.
#pragma unroll 1
            for (int kk = 0; kk < HD / 16; kk += 2) {
                u32 qa[2][2][4];   // [group][k step][fragment]
#pragma unroll
                for (int g = 0; g < 2; g++)
#pragma unroll
                    for (int k2 = 0; k2 < 2; k2++)
                        ldsm_x4(q_lane + (u32)((g * 16 * RP + (kk + k2) * 16) * 2), qa[g][k2][0], qa[g][k2][1],
                                qa[g][k2][2], qa[g][k2][3]);
#pragma unroll
                for (int nt = 0; nt < PF_BN / 8; nt++) {
                    u32 b0, b1, b2, b3;
                    ldsm_x4(kbase + (u32)((nt * 8 * RP + kk * 16) * 2) + k_lane, b0, b1, b2, b3);
#pragma unroll
                    for (int g = 0; g < 2; g++) {
                        mma_bf16(s[g][nt], qa[g][0], b0, b1);
                        mma_bf16(s[g][nt], qa[g][1], b2, b3);
                    }
                }
            }
            const bool diag = kb + PF_BN - 1 > warp_lo;
#pragma unroll
            for (int g = 0; g < 2; g++) {
                if (diag) {
#pragma unroll
                    for (int nt = 0; nt < PF_BN / 8; nt++)
#pragma unroll
                        for (int e = 0; e < 4; e++) {
                            const int key = kb + nt * 8 + tid * 2 + (e & 1);
                            const int p = pos_base + g * 16 + (e >> 1) * 8;
                            s[g][nt][e] = (p < ctx && key <= p) ? s[g][nt][e] * sl2 : NEG_INF;
                        }
                } else {
#pragma unroll
                    for (int nt = 0; nt < PF_BN / 8; nt++)
#pragma unroll
                        for (int e = 0; e < 4; e++) s[g][nt][e] *= sl2;
                }
                float mx0 = m[g][0], mx1 = m[g][1];
#pragma unroll
                for (int nt = 0; nt < PF_BN / 8; nt++) {
                    mx0 = fmaxf(mx0, fmaxf(s[g][nt][0], s[g][nt][1]));
                    mx1 = fmaxf(mx1, fmaxf(s[g][nt][2], s[g][nt][3]));
                }
                mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
                mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
                mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
                mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
                const float b0 = mx0 == NEG_INF ? 0.f : mx0, b1 = mx1 == NEG_INF ? 0.f : mx1;
                const float c0 = ex2((m[g][0] == NEG_INF ? b0 : m[g][0]) - b0);
                const float c1 = ex2((m[g][1] == NEG_INF ? b1 : m[g][1]) - b1);
                m[g][0] = mx0;
                m[g][1] = mx1;
                l[g][0] *= c0;
                l[g][1] *= c1;
#pragma unroll
                for (int i = 0; i < HD / 8; i++) {
                    o[g][i][0] *= c0;
                    o[g][i][1] *= c0;
                    o[g][i][2] *= c1;
                    o[g][i][3] *= c1;
                }
#pragma unroll
                for (int nt = 0; nt < PF_BN / 8; nt++) {
                    s[g][nt][0] = ex2(s[g][nt][0] - b0);
                    s[g][nt][1] = ex2(s[g][nt][1] - b0);
                    s[g][nt][2] = ex2(s[g][nt][2] - b1);
                    s[g][nt][3] = ex2(s[g][nt][3] - b1);
                    l[g][0] += s[g][nt][0] + s[g][nt][1];
                    l[g][1] += s[g][nt][2] + s[g][nt][3];
                }
            }
            // P as bf16 pairs (half the registers of the float scores), then O += P V, each V
            // fragment feeding both row groups.
            u32 pa[2][PF_BN / 16][4];
#pragma unroll
            for (int g = 0; g < 2; g++)
#pragma unroll
                for (int kk = 0; kk < PF_BN / 16; kk++) {
                    pa[g][kk][0] = cvt_bf2(s[g][2 * kk][0], s[g][2 * kk][1]);
                    pa[g][kk][1] = cvt_bf2(s[g][2 * kk][2], s[g][2 * kk][3]);
                    pa[g][kk][2] = cvt_bf2(s[g][2 * kk + 1][0], s[g][2 * kk + 1][1]);
                    pa[g][kk][3] = cvt_bf2(s[g][2 * kk + 1][2], s[g][2 * kk + 1][3]);
                }
#pragma unroll
            for (int kk = 0; kk < PF_BN / 16; kk++) {
#pragma unroll
                for (int dt = 0; dt < HD / 8; dt += 2) {
                    u32 b0v, b1v, b2v, b3v;
                    ldsm_x4_t(vbase + (u32)((kk * 16 * RP + dt * 8) * 2) + v_lane, b0v, b1v, b2v, b3v);
#pragma unroll
                    for (int g = 0; g < 2; g++) {
                        mma_bf16(o[g][dt], pa[g][kk], b0v, b1v);
                        mma_bf16(o[g][dt + 1], pa[g][kk], b2v, b3v);
                    }
                }
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int g = 0; g < 2; g++) {
        float l0 = l[g][0], l1 = l[g][1];
        l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
        l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
        l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
        l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
        const float i0 = l0 > 0.f ? 1.f / l0 : 0.f, i1 = l1 > 0.f ? 1.f / l1 : 0.f;
        const int r0 = wrow + g * 16 + gid;
        bf16* o0 = out + (u64)(q_start[seq] + r0) * out_stride + (u64)h * HD;
        bf16* o1 = o0 + (u64)8 * out_stride;
#pragma unroll
        for (int dt = 0; dt < HD / 8; dt++) {
            int c = dt * 8 + tid * 2;
            if (r0 < nq) *(u32*)(o0 + c) = pack_bf2(o[g][dt][0] * i0, o[g][dt][1] * i0);
            if (r0 + 8 < nq) *(u32*)(o1 + c) = pack_bf2(o[g][dt][2] * i1, o[g][dt][3] * i1);
        }
    }
}

#define PREFILL_WIDE_AS(NAME, HD, F8)                                                                        \
    extern "C" __global__ void __launch_bounds__(PF_WARPS * 32) NAME(                                         \
        const bf16* qkv, int q_stride, const bf16* cache, const int* block_tables, int max_blocks,            \
        const int* tiles, const int* q_start, const int* q_len, const int* ctx_lens, bf16* out, int out_stride, \
        int layer, int layers, int heads, int kv_heads, int block_size, float scale) {                        \
        prefill_attention_wide_impl<HD, F8>(qkv, q_stride, cache, block_tables, max_blocks, tiles, q_start,   \
                                            q_len, ctx_lens, out, out_stride, layer, layers, heads, kv_heads, \
                                            block_size, scale);                                               \
    }
#define PREFILL_WIDE(HD)                                                                                     \
    PREFILL_WIDE_AS(prefill_attention_wide_##HD, HD, false) PREFILL_WIDE_AS(prefill_attention_wide_f8_##HD, HD, true)
PREFILL_WIDE(64)
PREFILL_WIDE(128)

// ---------------------------------------------------------------------------------------------
// Decode attention on tensor cores. Same grid, split and outputs as decode_attention above
// (block = (kv head, sequence, split), unnormalised partial rows and (max, sum) pairs for
// attn_combine), but the group's query heads are the rows of an m16n8k16 tile (rows past the
// group are zeros) and the split's keys stream through shared memory 64 at a time, copied by
// cp.async two tiles deep, so the next tile's loads are in flight while this one is multiplied.
// Warp w takes keys 16w..16w+15 of every tile and keeps its own running max, sum and output;
// the four warps merge through shared memory at the end. Dynamic shared memory as the pipelined
// prefill kernel's.

template <int HD, int GROUP, bool F8>
__device__ void decode_attention_mma_impl(const bf16* qkv, int q_stride, const bf16* cache, const int* block_tables,
                                          int max_blocks, const int* ctx_lens, float* part_o, float* part_ml,
                                          int layer, int layers, int heads, int kv_heads, int block_size, int split,
                                          int max_splits, float scale) {
    constexpr int RP = HD + 8;
    constexpr int CH = HD / 8;
    constexpr int STAGE = 2 * PF_BN * RP;
    constexpr int KW = PF_BN / PF_WARPS;   // keys a warp takes from each tile (16)
    extern __shared__ __align__(16) bf16 pf_smem[];
    // FP8: one stage of the rows as f16 (E4M3 exactly), then DEC8_DEPTH raw stages (rows and
    // scales, Kv8Tile::fetch_h); the products run in f16 and the row scales apply to the scores
    // (K) and the probabilities (V).
    unsigned char* raw = (unsigned char*)(pf_smem + STAGE);
    constexpr int RAW_H = Kv8Tile<HD>::RAW_H;
    pdl_wait();
    pdl_trigger();

    const int kvh = blockIdx.x, b = blockIdx.y, sp = blockIdx.z;
    const int ctx = ctx_lens[b];
    const int start = sp * split;
    const int end = min(ctx, start + split);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gid = lane >> 2, tid = lane & 3;
    const u64 part = ((u64)b * heads + (u64)kvh * GROUP) * max_splits + sp;   // head g adds g*max_splits
    if (start >= end) {
        if (threadIdx.x < GROUP) {
            u64 p = part + (u64)threadIdx.x * max_splits;
            part_ml[2 * p] = NEG_INF;
            part_ml[2 * p + 1] = 0.f;
        }
        return;
    }
    const int kvw = kv_heads * HD;
    const u64 block_elems = (u64)layers * 2 * block_size * kvw;
    const int* table = block_tables + (u64)b * max_blocks;
    const int n_kt = (end - start + PF_BN - 1) / PF_BN;

    auto load_tile = [&](int t) {
        if (F8) {
            if (t < n_kt) {
                Kv8Tile<HD>::fetch_h(cache, table, start + t * PF_BN, end, layer, layers, kv_heads, kvh, block_size,
                                     raw + (t % DEC8_DEPTH) * RAW_H);
            } else {
                cp_async_commit();   // an empty group keeps the count the wait below relies on
            }
            return;
        }
        bf16* ks = pf_smem + (t & 1) * STAGE;
        bf16* vs = ks + PF_BN * RP;
        for (int c = threadIdx.x; c < PF_BN * CH; c += PF_WARPS * 32) {
            const int j = c / CH, part8 = c % CH;
            const int key = start + t * PF_BN + j;
            const bool ok = key < end;
            const bf16* src = cache;
            if (ok) {
                src = cache + (u64)table[key / block_size] * block_elems +
                      ((u64)(layer * 2) * block_size + key % block_size) * kvw + (u64)kvh * HD + part8 * 8;
            }
            cp_async16(smem_u32(ks + j * RP + part8 * 8), src, ok);
            cp_async16(smem_u32(vs + j * RP + part8 * 8), ok ? src + (u64)block_size * kvw : cache, ok);
        }
        cp_async_commit();
    };
    if (F8) {
#pragma unroll
        for (int t = 0; t < DEC8_DEPTH - 1; t++) load_tile(t);
    } else {
        load_tile(0);
    }

    // Rows gid (and gid + 8, zero for groups of 8 or fewer) are the group's heads.
    u32 qa[HD / 16][4];
    {
        const bf16* q0 = qkv + (u64)b * q_stride + (u64)(kvh * GROUP + gid) * HD;
        const bf16* q1 = q0 + 8 * HD;
        const bool h0 = gid < GROUP, h1 = gid + 8 < GROUP;
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            int c = kk * 16 + tid * 2;
            qa[kk][0] = h0 ? *(const u32*)(q0 + c) : 0u;
            qa[kk][1] = h1 ? *(const u32*)(q1 + c) : 0u;
            qa[kk][2] = h0 ? *(const u32*)(q0 + c + 8) : 0u;
            qa[kk][3] = h1 ? *(const u32*)(q1 + c + 8) : 0u;
            if (F8) {
#pragma unroll
                for (int r = 0; r < 4; r++) qa[kk][r] = cvt_h2(__uint_as_float(qa[kk][r] << 16), __uint_as_float(qa[kk][r] & 0xffff0000u));
            }
        }
    }
    float o[HD / 8][4];
#pragma unroll
    for (int i = 0; i < HD / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;
    const float sl2 = scale * LOG2E;
    const u32 k_lane = (u32)(((warp * KW + (lane & 7)) * RP + (lane >> 3) * 8) * 2);
    const u32 v_lane = (u32)(((warp * KW + (lane & 7) + ((lane >> 3) & 1) * 8) * RP + (lane >> 4) * 8) * 2);

    for (int t = 0; t < n_kt; t++) {
        const float* kv8_sc = (const float*)(raw + (t % DEC8_DEPTH) * RAW_H + Kv8Tile<HD>::ROWS);
        if (F8) {
            load_tile(t + DEC8_DEPTH - 1);
            cp_async_wait<DEC8_DEPTH - 1>();
            Kv8Tile<HD>::template widen_h<RP>(raw + (t % DEC8_DEPTH) * RAW_H, pf_smem);
        } else if (t + 1 < n_kt) {
            load_tile(t + 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const int kb = start + t * PF_BN + warp * KW;   // this warp's first key
        if (kb < end) {
            const u32 kbase = smem_u32(pf_smem + (F8 ? 0 : t & 1) * STAGE);
            const u32 vbase = kbase + PF_BN * RP * 2;
            float s[KW / 8][4];
#pragma unroll
            for (int nt = 0; nt < KW / 8; nt++) {
                s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
                for (int kk = 0; kk < HD / 16; kk += 2) {
                    u32 b0, b1, b2, b3;
                    ldsm_x4(kbase + (u32)((nt * 8 * RP + kk * 16) * 2) + k_lane, b0, b1, b2, b3);
                    mma_kv<F8>(s[nt], qa[kk], b0, b1);
                    mma_kv<F8>(s[nt], qa[kk + 1], b2, b3);
                }
            }
            // Rows gid + 8 of the tile would hold heads past the eighth, which no group has: their
            // scores are zeros, and the softmax below skips them (HI false).
            constexpr bool HI = GROUP > 8;
            float mx0 = m0, mx1 = m1;
#pragma unroll
            for (int nt = 0; nt < KW / 8; nt++) {
#pragma unroll
                for (int e = 0; e < (HI ? 4 : 2); e++) {
                    const int key = kb + nt * 8 + tid * 2 + (e & 1);
                    const float ks = F8 ? kv8_sc[warp * KW + nt * 8 + tid * 2 + (e & 1)] : 1.f;
                    s[nt][e] = key < end ? s[nt][e] * (sl2 * ks) : NEG_INF;
                }
                mx0 = fmaxf(mx0, fmaxf(s[nt][0], s[nt][1]));
                if (HI) mx1 = fmaxf(mx1, fmaxf(s[nt][2], s[nt][3]));
            }
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
            if (HI) {
                mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
                mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
            }
            // The warp's first key is valid, so both maxima are finite from here on.
            const float c0 = ex2(m0 - mx0), c1 = HI ? ex2(m1 - mx1) : 1.f;
            m0 = mx0;
            m1 = mx1;
            l0 *= c0;
            l1 *= c1;
            // Once the running maxima settle (c = 1 in every lane), the outputs need no rescaling.
            if (__any_sync(0xffffffffu, c0 != 1.f || c1 != 1.f)) {
#pragma unroll
                for (int i = 0; i < HD / 8; i++) {
                    o[i][0] *= c0;
                    o[i][1] *= c0;
                    if (HI) {
                        o[i][2] *= c1;
                        o[i][3] *= c1;
                    }
                }
            }
#pragma unroll
            for (int nt = 0; nt < KW / 8; nt++) {
                s[nt][0] = ex2(s[nt][0] - mx0);
                s[nt][1] = ex2(s[nt][1] - mx0);
                l0 += s[nt][0] + s[nt][1];
                if (HI) {
                    s[nt][2] = ex2(s[nt][2] - mx1);
                    s[nt][3] = ex2(s[nt][3] - mx1);
                    l1 += s[nt][2] + s[nt][3];
                } else {
                    s[nt][2] = s[nt][3] = 0.f;
                }
            }
            u32 pa[4];
            if (F8) {
                // Keys tid·2, tid·2 + 1 and 8 past them, each probability times its V row's scale.
                const float* vs = kv8_sc + PF_BN + warp * KW + tid * 2;
                pa[0] = cvt_h2(s[0][0] * vs[0], s[0][1] * vs[1]);
                pa[1] = cvt_h2(s[0][2] * vs[0], s[0][3] * vs[1]);
                pa[2] = cvt_h2(s[1][0] * vs[8], s[1][1] * vs[9]);
                pa[3] = cvt_h2(s[1][2] * vs[8], s[1][3] * vs[9]);
            } else {
                pa[0] = cvt_bf2(s[0][0], s[0][1]);
                pa[1] = cvt_bf2(s[0][2], s[0][3]);
                pa[2] = cvt_bf2(s[1][0], s[1][1]);
                pa[3] = cvt_bf2(s[1][2], s[1][3]);
            }
            if (!HI) pa[1] = pa[3] = 0u;
#pragma unroll
            for (int dt = 0; dt < HD / 8; dt += 2) {
                u32 b0v, b1v, b2v, b3v;
                ldsm_x4_t(vbase + (u32)(dt * 8 * 2) + v_lane, b0v, b1v, b2v, b3v);
                mma_kv<F8>(o[dt], pa, b0v, b1v);
                mma_kv<F8>(o[dt + 1], pa, b2v, b3v);
            }
        }
        __syncthreads();
    }

    // Merge the warps: (max, sum) per row, then the rows' outputs rescaled to the common max.
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    float* wo = (float*)pf_smem;                       // [warp][GROUP][HD]
    float* wml = wo + PF_WARPS * GROUP * HD;           // [warp][GROUP][2]
    if (gid < GROUP) {
#pragma unroll
        for (int dt = 0; dt < HD / 8; dt++) {
            float* r = wo + (warp * GROUP + gid) * HD + dt * 8 + tid * 2;
            r[0] = o[dt][0];
            r[1] = o[dt][1];
        }
        if (tid == 0) {
            wml[2 * (warp * GROUP + gid)] = m0;
            wml[2 * (warp * GROUP + gid) + 1] = l0;
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < GROUP * HD; i += blockDim.x) {
        const int g = i / HD, d = i % HD;
        float m = NEG_INF;
#pragma unroll
        for (int w = 0; w < PF_WARPS; w++) m = fmaxf(m, wml[2 * (w * GROUP + g)]);
        float acc = 0.f, l = 0.f;
#pragma unroll
        for (int w = 0; w < PF_WARPS; w++) {
            const float wm = wml[2 * (w * GROUP + g)];
            const float c = wm == NEG_INF ? 0.f : ex2(wm - m);
            acc += c * wo[(w * GROUP + g) * HD + d];
            l += c * wml[2 * (w * GROUP + g) + 1];
        }
        const u64 p = part + (u64)g * max_splits;
        part_o[p * HD + d] = acc;
        if (d == 0) {
            part_ml[2 * p] = m * (1.f / LOG2E);   // attn_combine works in natural-log units
            part_ml[2 * p + 1] = l;
        }
    }
}

#define DECODE_MMA_AS(NAME, HD, G, F8)                                                                       \
    extern "C" __global__ void __launch_bounds__(PF_WARPS * 32) NAME(                                         \
        const bf16* qkv, int q_stride, const bf16* cache, const int* block_tables, int max_blocks,            \
        const int* ctx_lens, float* part_o, float* part_ml, int layer, int layers, int heads, int kv_heads,   \
        int block_size, int split, int max_splits, float scale) {                                             \
        decode_attention_mma_impl<HD, G, F8>(qkv, q_stride, cache, block_tables, max_blocks, ctx_lens,        \
                                             part_o, part_ml, layer, layers, heads, kv_heads, block_size,     \
                                             split, max_splits, scale);                                       \
    }
#define DECODE_MMA(HD, G)                                                                                    \
    DECODE_MMA_AS(decode_attention_mma_##HD##_##G, HD, G, false)                                              \
    DECODE_MMA_AS(decode_attention_mma_f8_##HD##_##G, HD, G, true)
#define DECODE_MMA_GROUPS(HD) DECODE_MMA(HD, 1) DECODE_MMA(HD, 2) DECODE_MMA(HD, 3) DECODE_MMA(HD, 4) DECODE_MMA(HD, 5) DECODE_MMA(HD, 6) DECODE_MMA(HD, 7) DECODE_MMA(HD, 8)
DECODE_MMA_GROUPS(64)
DECODE_MMA_GROUPS(128)

// ---------------------------------------------------------------------------------------------
// Matrix-vector products for the smallest batches (decode at batch ≤ 2): y[n][r] = Σ_k W[r][k]
// x[n][k], W row-major bf16 [rows × cols], x bf16 [n × cols]. One warp per output row, 16-byte
// weight loads that bypass L1, eight in flight per lane. mode 0: y bf16; 1: y f32; 2: y f32 +=
// (the residual add). Requires cols % 8 == 0.
//

// The fused forms take the stage before them into a prologue, one kernel boundary fewer each:
// IN 1 makes x = RMSNorm(residual) · norm weight from the f32 residual rows, IN 2 makes
// x = SiLU(gate) · up from the bf16 gate|up rows (width 2·cols). The block computes its input
// rows once into shared memory (bf16, rounded as the separate kernels round them) while its first
// weight loads are in flight, then every warp reads x from there.

template <int N, int IN>
__device__ __forceinline__ void gemv_stage_input(const void* xin, const bf16* nw, float eps, bf16* xs, int cols) {
    __shared__ float scratch[32];
    for (int n = 0; n < N; n++) {
        if (IN == 1) {
            const float* xr = (const float*)xin + (u64)n * cols;
            float ss = 0.f;
            for (int j = threadIdx.x * 4; j < cols; j += blockDim.x * 4) {
                const float4 v = *(const float4*)(xr + j);
                ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
            }
            const float inv = rsqrtf(block_sum(ss, scratch) / cols + eps);
            for (int j = threadIdx.x * 4; j < cols; j += blockDim.x * 4) {
                const float4 v = *(const float4*)(xr + j);
                xs[n * cols + j] = f2bf(v.x * inv * bf2f(nw[j]));
                xs[n * cols + j + 1] = f2bf(v.y * inv * bf2f(nw[j + 1]));
                xs[n * cols + j + 2] = f2bf(v.z * inv * bf2f(nw[j + 2]));
                xs[n * cols + j + 3] = f2bf(v.w * inv * bf2f(nw[j + 3]));
            }
        } else {
            const bf16* gr = (const bf16*)xin + (u64)n * 2 * cols;
            for (int j = threadIdx.x * 8; j < cols; j += blockDim.x * 8) {
                float g[8], u[8];
                unpack8(*(const uint4*)(gr + j), g);
                unpack8(*(const uint4*)(gr + cols + j), u);
#pragma unroll
                for (int e = 0; e < 8; e++) xs[n * cols + j + e] = f2bf(g[e] / (1.f + __expf(-g[e])) * u[e]);
            }
        }
    }
    __syncthreads();
}

template <int N, int IN>
__device__ void gemv_impl(const bf16* w, const void* xin, const bf16* nw, float eps, void* y, int rows, int cols,
                          int mode) {
    extern __shared__ __align__(16) bf16 gemv_xs[];
    pdl_trigger();
    const int lane = threadIdx.x & 31;
    const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const bool live = r < rows;
    if (IN == 0 && !live) return;
    const bf16* wr = w + (u64)r * cols;
    float acc[N];
#pragma unroll
    for (int n = 0; n < N; n++) acc[n] = 0.f;
    constexpr int U = 8;
    int k = lane * 8;
    // The first weights are requested before waiting on the kernel ahead (launched as its
    // dependent, this one starts during its tail): weights are never written by a pass, so the
    // loads may run early; x and y are touched only after the wait.
    uint4 wv[U];
    bool more = live && k + (U - 1) * 256 < cols;
    if (more) {
#pragma unroll
        for (int u = 0; u < U; u++) wv[u] = ldg_stream(wr + k + u * 256);
    }
    pdl_wait();
    const bf16* x = (const bf16*)xin;
    if (IN != 0) {
        gemv_stage_input<N, IN>(xin, nw, eps, gemv_xs, cols);
        x = gemv_xs;
        if (!live) return;
    }
    while (more) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            float wf[8];
            unpack8(wv[u], wf);
#pragma unroll
            for (int n = 0; n < N; n++) {
                float xf[8];
                unpack8(*(const uint4*)(x + (u64)n * cols + k + u * 256), xf);
#pragma unroll
                for (int j = 0; j < 8; j++) acc[n] += wf[j] * xf[j];
            }
        }
        k += U * 256;
        more = k + (U - 1) * 256 < cols;
        if (more) {
#pragma unroll
            for (int u = 0; u < U; u++) wv[u] = ldg_stream(wr + k + u * 256);
        }
    }
    for (; k < cols; k += 256) {
        float wf[8];
        unpack8(ldg_stream(wr + k), wf);
#pragma unroll
        for (int n = 0; n < N; n++) {
            float xf[8];
            unpack8(*(const uint4*)(x + (u64)n * cols + k), xf);
#pragma unroll
            for (int j = 0; j < 8; j++) acc[n] += wf[j] * xf[j];
        }
    }
#pragma unroll
    for (int n = 0; n < N; n++) acc[n] = warp_sum(acc[n]);
    if (lane == 0) {
#pragma unroll
        for (int n = 0; n < N; n++) {
            u64 i = (u64)n * rows + r;
            if (mode == 0) ((bf16*)y)[i] = f2bf(acc[n]);
            else if (mode == 1) ((float*)y)[i] = acc[n];
            else ((float*)y)[i] += acc[n];
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) gemv_1(const bf16* w, const bf16* x, void* y, int rows, int cols, int mode) {
    gemv_impl<1, 0>(w, x, nullptr, 0.f, y, rows, cols, mode);
}
extern "C" __global__ void __launch_bounds__(256) gemv_2(const bf16* w, const bf16* x, void* y, int rows, int cols, int mode) {
    gemv_impl<2, 0>(w, x, nullptr, 0.f, y, rows, cols, mode);
}
#define GEMV_FUSED(NAME, N, IN)                                                                              \
    extern "C" __global__ void __launch_bounds__(256) NAME(const bf16* w, const void* x, const bf16* nw,      \
                                                           float eps, void* y, int rows, int cols, int mode) { \
        gemv_impl<N, IN>(w, x, nw, eps, y, rows, cols, mode);                                                 \
    }
GEMV_FUSED(gemv_norm_1, 1, 1)
GEMV_FUSED(gemv_norm_2, 2, 1)
GEMV_FUSED(gemv_silu_1, 1, 2)
GEMV_FUSED(gemv_silu_2, 2, 2)

// ---------------------------------------------------------------------------------------------
// FP8 weights: E4M3 bytes with one f32 scale per output row, W[r][k] = scale[r] · e4m3(q[r][k]),
// widened as described at the top of this file.

// One block per row: the row's largest magnitude sets scale = amax / 448, then every weight is
// rounded to the nearest E4M3 value of w / scale. Requires cols % 4 == 0.
extern "C" __global__ void quantize_fp8_rows(const bf16* w, unsigned char* q, float* scale, int cols) {
    __shared__ float scratch[32];
    const bf16* wr = w + (u64)blockIdx.x * cols;
    float m = 0.f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) m = fmaxf(m, fabsf(bf2f(wr[j])));
    m = block_max(m, scratch);
    const float s = m > 0.f ? m / 448.f : 1.f;
    if (threadIdx.x == 0) scale[blockIdx.x] = s;
    u32* qr = (u32*)(q + (u64)blockIdx.x * cols);
    for (int j = threadIdx.x * 4; j < cols; j += blockDim.x * 4) {
        qr[j / 4] = f2e4m3(bf2f(wr[j]) / s) | (f2e4m3(bf2f(wr[j + 1]) / s) << 8) | (f2e4m3(bf2f(wr[j + 2]) / s) << 16) |
                    (f2e4m3(bf2f(wr[j + 3]) / s) << 24);
    }
}

// Back to bf16 (a GEMM of more tokens than the FP8 matrix-vector kernel takes runs on these):
// n elements, rows of `cols`, four a thread. Requires cols % 4 == 0.
extern "C" __global__ void dequantize_fp8_rows(const unsigned char* q, const float* scale, bf16* out, u64 n, int cols) {
    for (u64 i = (blockIdx.x * (u64)blockDim.x + threadIdx.x) * 4; i < n; i += (u64)gridDim.x * blockDim.x * 4) {
        float f[4];
        fp8x4_widen(*(const u32*)(q + i), f);
        const float s = scale[i / cols] * FP8_UNBIAS;
        *(uint2*)(out + i) = make_uint2(pack_bf2(f[0] * s, f[1] * s), pack_bf2(f[2] * s, f[3] * s));
    }
}

// The matrix-vector product on FP8 weights, as `gemv_impl` on bf16 ones: one warp per output
// row, sixteen weights (one 16-byte load) a lane at a time, four loads in flight, the first ones
// issued before waiting on the kernel ahead. Requires cols % 16 == 0.
template <int N>
__device__ __forceinline__ void fp8_dot16(uint4 wv, const bf16* x, int cols, int k, float* acc) {
    float wf[16];
    fp8x4_widen(wv.x, wf);
    fp8x4_widen(wv.y, wf + 4);
    fp8x4_widen(wv.z, wf + 8);
    fp8x4_widen(wv.w, wf + 12);
#pragma unroll
    for (int n = 0; n < N; n++) {
        float xf[16];
        unpack8(*(const uint4*)(x + (u64)n * cols + k), xf);
        unpack8(*(const uint4*)(x + (u64)n * cols + k + 8), xf + 8);
        float a = 0.f, b = 0.f;
#pragma unroll
        for (int j = 0; j < 16; j += 2) {
            a += wf[j] * xf[j];
            b += wf[j + 1] * xf[j + 1];
        }
        acc[n] += a + b;
    }
}

template <int N>
__device__ void gemv_fp8_impl(const unsigned char* w, const float* scale, const bf16* x, void* y, int rows, int cols, int mode) {
    pdl_trigger();
    const int lane = threadIdx.x & 31;
    const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= rows) return;
    const unsigned char* wr = w + (u64)r * cols;
    float acc[N];
#pragma unroll
    for (int n = 0; n < N; n++) acc[n] = 0.f;
    constexpr int U = 4;
    int k = lane * 16;
    uint4 wv[U];
    bool more = k + (U - 1) * 512 < cols;
    if (more) {
#pragma unroll
        for (int u = 0; u < U; u++) wv[u] = ldg_stream(wr + k + u * 512);
    }
    pdl_wait();
    while (more) {
#pragma unroll
        for (int u = 0; u < U; u++) fp8_dot16<N>(wv[u], x, cols, k + u * 512, acc);
        k += U * 512;
        more = k + (U - 1) * 512 < cols;
        if (more) {
#pragma unroll
            for (int u = 0; u < U; u++) wv[u] = ldg_stream(wr + k + u * 512);
        }
    }
    for (; k < cols; k += 512) fp8_dot16<N>(ldg_stream(wr + k), x, cols, k, acc);
#pragma unroll
    for (int n = 0; n < N; n++) acc[n] = warp_sum(acc[n]);
    if (lane == 0) {
        const float s = scale[r] * FP8_UNBIAS;
#pragma unroll
        for (int n = 0; n < N; n++) {
            u64 i = (u64)n * rows + r;
            if (mode == 0) ((bf16*)y)[i] = f2bf(acc[n] * s);
            else if (mode == 1) ((float*)y)[i] = acc[n] * s;
            else ((float*)y)[i] += acc[n] * s;
        }
    }
}

#define GEMV_FP8(N)                                                                                               \
    extern "C" __global__ void __launch_bounds__(256)                                                             \
        gemv_fp8_##N(const unsigned char* w, const float* scale, const bf16* x, void* y, int rows, int cols, int mode) { \
        gemv_fp8_impl<N>(w, scale, x, y, rows, cols, mode);                                                       \
    }
GEMV_FP8(1)
GEMV_FP8(2)
GEMV_FP8(3)
GEMV_FP8(4)
GEMV_FP8(5)
GEMV_FP8(6)
GEMV_FP8(7)
GEMV_FP8(8)

// The same product on the tensor cores, for up to 8·NT tokens: the arithmetic of the kernel
// above (five integer operations to widen each weight, then a scalar FMA per token) caps it
// well below the memory's speed, so here weights are widened two at a time into bf16 pairs
// (three operations: a byte permute that also replicates each byte's sign, a shift, a mask)
// and multiplied by `mma.m16n8k16` with f32 accumulation.
//
// A block owns 16 rows; its eight warps take interleaved 64-byte steps along K (split-K within
// the block, summed through shared memory at the end). In a step, lane (g = lane / 4,
// t = lane % 4) loads the 16 bytes at k + 16t of rows g and g + 8, which are its A fragments
// for four products; the order of k inside a product does not change the dot product, so the
// fragment's k slots {2t, 2t+1, 2t+8, 2t+9} of product j are taken to be bytes 4j..4j+3 of
// those 16, and the B fragment (token g, and g + 8 with NT = 2) reads the same x elements.
// Tokens past n contribute zero fragments. Requires cols % 64 == 0.

// Bytes 0 and 1 (sel 0x9180) or 2 and 3 (sel 0xB3A2) of w as a bf16 pair, each the byte's
// E4M3 value times 2^-120: prmt writes [b, sign(b)…, b', sign(b')…], so after a shift by 4
// each half holds s 0000 eeee mmm 0000 once the copies of the sign are masked off.
__device__ __forceinline__ u32 e4m3x2_bf16x2(u32 w, u32 sel) {
    u32 r;
    asm("prmt.b32 %0, %1, 0, %2;" : "=r"(r) : "r"(w), "r"(sel));
    return (r << 4) & 0x87F087F0u;
}

template <int NT>
__device__ __forceinline__ void fp8_mma_step(uint4 qa, uint4 qb, const bf16* x, int xstride, int n, int k, int g, float (*acc)[4]) {
    uint4 xb[NT][2];
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        const int tok = nt * 8 + g;
        if (tok < n) {
            const bf16* xr = x + (u64)tok * xstride + k;
            xb[nt][0] = *(const uint4*)xr;
            xb[nt][1] = *(const uint4*)(xr + 8);
        } else {
            xb[nt][0] = xb[nt][1] = make_uint4(0, 0, 0, 0);
        }
    }
    const u32 wa[4] = {qa.x, qa.y, qa.z, qa.w}, wb[4] = {qb.x, qb.y, qb.z, qb.w};
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const u32 a[4] = {e4m3x2_bf16x2(wa[j], 0x9180u), e4m3x2_bf16x2(wb[j], 0x9180u), e4m3x2_bf16x2(wa[j], 0xB3A2u),
                          e4m3x2_bf16x2(wb[j], 0xB3A2u)};
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            const uint4 v = xb[nt][j >> 1];
            const u32 b0 = (j & 1) ? v.z : v.x, b1 = (j & 1) ? v.w : v.y;
            mma_bf16(acc[nt], a, b0, b1);
        }
    }
}

// NT n-tiles of 8 tokens, U steps in flight a warp, WARPS warps a block; SX stages x in dynamic
// shared memory (rows of cols + 8 elements, the padding spreading tokens over the banks) once
// the kernel ahead has written it, instead of reading it from the caches at every step.
template <int NT, int U, int WARPS, bool SX>
__device__ void gemv_fp8_mma_impl(const unsigned char* w, const float* scale, const bf16* x, void* y, int rows, int cols, int n, int mode) {
    __shared__ float part[WARPS][16][8 * NT + 1];
    extern __shared__ __align__(16) unsigned char fp8_dyn[];
    pdl_trigger();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int r0 = blockIdx.x * 16;
    // Rows past the end read the last row (their sums are never written).
    const unsigned char* wa = w + (u64)min(r0 + g, rows - 1) * cols + t * 16;
    const unsigned char* wb = w + (u64)min(r0 + g + 8, rows - 1) * cols + t * 16;
    const int steps = cols >> 6;
    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; nt++) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
    uint4 qa[U], qb[U];
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int st = warp + u * WARPS;
        if (st < steps) {
            qa[u] = ldg_stream(wa + (u64)st * 64);
            qb[u] = ldg_stream(wb + (u64)st * 64);
        }
    }
    pdl_wait();
    const bf16* xs = x;
    int xstride = cols;
    if (SX) {
        bf16* sx = (bf16*)fp8_dyn;
        xstride = cols + 8;
        const int per_row = cols / 8;
        for (int i = threadIdx.x; i < n * per_row; i += WARPS * 32) {
            const int tok = i / per_row, c = (i % per_row) * 8;
            *(uint4*)(sx + tok * xstride + c) = *(const uint4*)(x + (u64)tok * cols + c);
        }
        __syncthreads();
        xs = sx;
    }
    for (int s = warp; s < steps; s += U * WARPS) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int st = s + u * WARPS;
            if (st < steps) {
                fp8_mma_step<NT>(qa[u], qb[u], xs, xstride, n, st * 64 + t * 16, g, acc);
                const int next = st + U * WARPS;
                if (next < steps) {
                    qa[u] = ldg_stream(wa + (u64)next * 64);
                    qb[u] = ldg_stream(wb + (u64)next * 64);
                }
            }
        }
    }
    // C fragment: (row g, tokens 2t and 2t+1) and (row g + 8, the same tokens), per n-tile.
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        part[warp][g][nt * 8 + 2 * t] = acc[nt][0];
        part[warp][g][nt * 8 + 2 * t + 1] = acc[nt][1];
        part[warp][g + 8][nt * 8 + 2 * t] = acc[nt][2];
        part[warp][g + 8][nt * 8 + 2 * t + 1] = acc[nt][3];
    }
    __syncthreads();
    const int i = threadIdx.x / (8 * NT), c = threadIdx.x % (8 * NT), r = r0 + i;
    if (threadIdx.x < 16 * 8 * NT && r < rows && c < n) {
        float sum = 0.f;
#pragma unroll
        for (int v = 0; v < WARPS; v++) sum += part[v][i][c];
        const float out = sum * (scale[r] * FP8_UNBIAS);
        const u64 o = (u64)c * rows + r;
        if (mode == 0) ((bf16*)y)[o] = f2bf(out);
        else if (mode == 1) ((float*)y)[o] = out;
        else ((float*)y)[o] += out;
    }
}

#define GEMV_FP8_MMA(NAME, NT, U, WARPS, SX)                                                                          \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                                          \
        NAME(const unsigned char* w, const float* scale, const bf16* x, void* y, int rows, int cols, int n, int mode) { \
        gemv_fp8_mma_impl<NT, U, WARPS, SX>(w, scale, x, y, rows, cols, n, mode);                                     \
    }
GEMV_FP8_MMA(gemv_fp8_mma_8, 1, 4, 8, false)
GEMV_FP8_MMA(gemv_fp8_mma_16, 2, 4, 8, false)
// Variants measured against the default (`TANDEM_CUDA_FP8_MMA=u8|w4|sx`, up to 8 tokens).
GEMV_FP8_MMA(gemv_fp8_mma_8_u8, 1, 8, 8, false)
GEMV_FP8_MMA(gemv_fp8_mma_8_w4, 1, 4, 4, false)
GEMV_FP8_MMA(gemv_fp8_mma_8_sx, 1, 4, 8, true)

// The same products for mid-sized passes (17 to 8·NT tokens), where cuBLASLt's FP8 kernels
// for these skinny shapes run at half the memory's speed. The input's reads now outweigh the
// weights' (each 16 weight rows would read all n input rows of K again), so a warp takes R
// row tiles of 16 and feeds each input fragment it loads to all R of them; the block's eight
// warps take interleaved 64-byte steps of its K slice as above, summed in shared memory. The
// grid is (row blocks of 16·R, K slices): with one slice the block applies `mode` itself;
// with more, slice s writes its scaled sums to part[s][n × rows] and `splitk_reduce` adds
// them (and the residual). Requires kc % 64 == 0, kc the slice's depth.
template <int NT, int R>
__device__ void gemm_fp8_mma_impl(const unsigned char* w, const float* scale, const bf16* x, void* y, float* part, int rows, int cols, int n, int kc, int mode) {
    constexpr int WARPS = 8, U = 2;
    __shared__ float sum[16 * R][8 * NT + 1];
    pdl_trigger();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int r0 = blockIdx.x * 16 * R, k0 = blockIdx.y * kc;
    const unsigned char* wa[R];
    const unsigned char* wb[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        // Rows past the end read the last row (their sums are never written).
        wa[r] = w + (u64)min(r0 + 16 * r + g, rows - 1) * cols + k0 + t * 16;
        wb[r] = w + (u64)min(r0 + 16 * r + g + 8, rows - 1) * cols + k0 + t * 16;
    }
    for (int i = threadIdx.x; i < 16 * R * (8 * NT + 1); i += WARPS * 32) (&sum[0][0])[i] = 0.f;
    const int steps = kc >> 6;
    float acc[R][NT][4];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++) acc[r][nt][0] = acc[r][nt][1] = acc[r][nt][2] = acc[r][nt][3] = 0.f;
    uint4 qa[U][R], qb[U][R];
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int st = warp + u * WARPS;
        if (st < steps) {
#pragma unroll
            for (int r = 0; r < R; r++) {
                qa[u][r] = ldg_stream(wa[r] + (u64)st * 64);
                qb[u][r] = ldg_stream(wb[r] + (u64)st * 64);
            }
        }
    }
    pdl_wait();
    const bf16* xk = x + k0 + t * 16;
    for (int s = warp; s < steps; s += U * WARPS) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int st = s + u * WARPS;
            if (st < steps) {
                uint4 xb[NT][2];
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
                    const int tok = nt * 8 + g;
                    if (tok < n) {
                        const bf16* xr = xk + (u64)tok * cols + st * 64;
                        xb[nt][0] = *(const uint4*)xr;
                        xb[nt][1] = *(const uint4*)(xr + 8);
                    } else {
                        xb[nt][0] = xb[nt][1] = make_uint4(0, 0, 0, 0);
                    }
                }
#pragma unroll
                for (int j = 0; j < 4; j++) {
#pragma unroll
                    for (int r = 0; r < R; r++) {
                        const u32 la = j == 0 ? qa[u][r].x : j == 1 ? qa[u][r].y : j == 2 ? qa[u][r].z : qa[u][r].w;
                        const u32 lb = j == 0 ? qb[u][r].x : j == 1 ? qb[u][r].y : j == 2 ? qb[u][r].z : qb[u][r].w;
                        const u32 a[4] = {e4m3x2_bf16x2(la, 0x9180u), e4m3x2_bf16x2(lb, 0x9180u), e4m3x2_bf16x2(la, 0xB3A2u),
                                          e4m3x2_bf16x2(lb, 0xB3A2u)};
#pragma unroll
                        for (int nt = 0; nt < NT; nt++) {
                            const uint4 v = xb[nt][j >> 1];
                            mma_bf16(acc[r][nt], a, (j & 1) ? v.z : v.x, (j & 1) ? v.w : v.y);
                        }
                    }
                }
                const int next = st + U * WARPS;
                if (next < steps) {
#pragma unroll
                    for (int r = 0; r < R; r++) {
                        qa[u][r] = ldg_stream(wa[r] + (u64)next * 64);
                        qb[u][r] = ldg_stream(wb[r] + (u64)next * 64);
                    }
                }
            }
        }
    }
    __syncthreads();  // the zeroing of `sum` is done
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            atomicAdd(&sum[16 * r + g][nt * 8 + 2 * t], acc[r][nt][0]);
            atomicAdd(&sum[16 * r + g][nt * 8 + 2 * t + 1], acc[r][nt][1]);
            atomicAdd(&sum[16 * r + g + 8][nt * 8 + 2 * t], acc[r][nt][2]);
            atomicAdd(&sum[16 * r + g + 8][nt * 8 + 2 * t + 1], acc[r][nt][3]);
        }
    __syncthreads();
    // Consecutive threads take consecutive rows of one token: the stores coalesce.
    for (int i = threadIdx.x; i < 16 * R * n; i += WARPS * 32) {
        const int c = i / (16 * R), ri = i % (16 * R), rr = r0 + ri;
        if (rr >= rows) continue;
        const float out = sum[ri][c] * (scale[rr] * FP8_UNBIAS);
        const u64 o = (u64)c * rows + rr;
        if (gridDim.y > 1) part[(u64)blockIdx.y * n * rows + o] = out;
        else if (mode == 0) ((bf16*)y)[o] = f2bf(out);
        else if (mode == 1) ((float*)y)[o] = out;
        else ((float*)y)[o] += out;
    }
}

// The mid-sized GEMM with the work cut the other way: each warp owns R row tiles of 16 rows over
// the block's whole K slice, so no sums cross warps, and the input is staged once per block in
// shared memory, chunks of CH columns brought in by cp.async one chunk ahead (tokens past n
// zero-filled) and read by all eight warps. A warp streams its own rows, U 64-column steps in
// flight. Requires kc % CH == 0; dynamic shared memory 2 · 8·NT · (CH + 8) bf16.
template <int NT, int R, int U, int CH>
__device__ void gemm_fp8_rows_impl(const unsigned char* w, const float* scale, const bf16* x, void* y, float* part, int rows, int cols, int n, int kc, int mode) {
    constexpr int WARPS = 8, XS = CH + 8, STEPS = CH / 64;
    static_assert(STEPS % U == 0, "a chunk holds whole rounds of steps");
    extern __shared__ __align__(16) unsigned char fp8_dyn[];
    bf16* xs = (bf16*)fp8_dyn;  // [2][8·NT][XS]
    pdl_trigger();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int r0 = (blockIdx.x * WARPS + warp) * 16 * R, k0 = blockIdx.y * kc;
    const unsigned char* wa[R];
    const unsigned char* wb[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        // Rows past the end read the last row (their sums are never written).
        wa[r] = w + (u64)min(r0 + 16 * r + g, rows - 1) * cols + k0 + t * 16;
        wb[r] = w + (u64)min(r0 + 16 * r + g + 8, rows - 1) * cols + k0 + t * 16;
    }
    const int steps = kc / 64, chunks = kc / CH;
    float acc[R][NT][4];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++) acc[r][nt][0] = acc[r][nt][1] = acc[r][nt][2] = acc[r][nt][3] = 0.f;
    uint4 qa[U][R], qb[U][R];
#pragma unroll
    for (int u = 0; u < U; u++) {
        if (u < steps) {
#pragma unroll
            for (int r = 0; r < R; r++) {
                qa[u][r] = ldg_stream(wa[r] + u * 64);
                qb[u][r] = ldg_stream(wb[r] + u * 64);
            }
        }
    }
    pdl_wait();
    // Chunk c of the input into buffer c & 1: 8·NT rows of CH / 8 sixteen-byte pieces.
    auto stage = [&](int c) {
        bf16* dst = xs + (c & 1) * (8 * NT * XS);
        for (int i = threadIdx.x; i < 8 * NT * (CH / 8); i += WARPS * 32) {
            const int tok = i / (CH / 8), piece = i % (CH / 8);
            const bool ok = tok < n;
            const bf16* src = x + (u64)(ok ? tok : 0) * cols + k0 + c * CH + piece * 8;
            cp_async16(smem_u32(dst + tok * XS + piece * 8), src, ok);
        }
        cp_async_commit();
    };
    stage(0);
    for (int c = 0; c < chunks; c++) {
        if (c + 1 < chunks) {
            stage(c + 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const bf16* xc = xs + (c & 1) * (8 * NT * XS) + g * XS + t * 16;
#pragma unroll
        for (int s0 = 0; s0 < STEPS; s0 += U) {
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int sc = s0 + u;  // step within the chunk; its weights are in slot u
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
                    const bf16* xr = xc + nt * 8 * XS + sc * 64;
                    const uint4 x0 = *(const uint4*)xr, x1 = *(const uint4*)(xr + 8);
#pragma unroll
                    for (int j = 0; j < 4; j++) {
                        const uint4 v = j < 2 ? x0 : x1;
                        const u32 b0 = (j & 1) ? v.z : v.x, b1 = (j & 1) ? v.w : v.y;
#pragma unroll
                        for (int r = 0; r < R; r++) {
                            const u32 la = j == 0 ? qa[u][r].x : j == 1 ? qa[u][r].y : j == 2 ? qa[u][r].z : qa[u][r].w;
                            const u32 lb = j == 0 ? qb[u][r].x : j == 1 ? qb[u][r].y : j == 2 ? qb[u][r].z : qb[u][r].w;
                            const u32 a[4] = {e4m3x2_bf16x2(la, 0x9180u), e4m3x2_bf16x2(lb, 0x9180u), e4m3x2_bf16x2(la, 0xB3A2u),
                                              e4m3x2_bf16x2(lb, 0xB3A2u)};
                            mma_bf16(acc[r][nt], a, b0, b1);
                        }
                    }
                }
                const int next = c * STEPS + sc + U;
                if (next < steps) {
#pragma unroll
                    for (int r = 0; r < R; r++) {
                        qa[u][r] = ldg_stream(wa[r] + (u64)next * 64);
                        qb[u][r] = ldg_stream(wb[r] + (u64)next * 64);
                    }
                }
            }
        }
        __syncthreads();  // buffer c & 1 is free for chunk c + 2
    }
    // C fragment: (row g, tokens 2t and 2t+1) and (row g + 8, the same tokens), per tile.
#pragma unroll
    for (int r = 0; r < R; r++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int row = r0 + 16 * r + g + 8 * h;
            if (row >= rows) continue;
            const float f = scale[row] * FP8_UNBIAS;
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int tok = nt * 8 + 2 * t + e;
                    if (tok >= n) continue;
                    const float out = acc[r][nt][2 * h + e] * f;
                    const u64 o = (u64)tok * rows + row;
                    if (gridDim.y > 1) part[(u64)blockIdx.y * n * rows + o] = out;
                    else if (mode == 0) ((bf16*)y)[o] = f2bf(out);
                    else if (mode == 1) ((float*)y)[o] = out;
                    else ((float*)y)[o] += out;
                }
            }
        }
    }
}

#define GEMM_FP8_MMA(NAME, NT, R)                                                                                 \
    extern "C" __global__ void __launch_bounds__(256) NAME(const unsigned char* w, const float* scale, const bf16* x, \
                                                           void* y, float* part, int rows, int cols, int n, int kc,  \
                                                           int mode) {                                               \
        gemm_fp8_mma_impl<NT, R>(w, scale, x, y, part, rows, cols, n, kc, mode);                                  \
    }
GEMM_FP8_MMA(gemm_fp8_mma_32, 4, 4)
GEMM_FP8_MMA(gemm_fp8_mma_64, 8, 2)

#define GEMM_FP8_ROWS(NAME, NT, R, U, CH)                                                                         \
    extern "C" __global__ void __launch_bounds__(256) NAME(const unsigned char* w, const float* scale, const bf16* x, \
                                                           void* y, float* part, int rows, int cols, int n, int kc,  \
                                                           int mode) {                                               \
        gemm_fp8_rows_impl<NT, R, U, CH>(w, scale, x, y, part, rows, cols, n, kc, mode);                          \
    }
GEMM_FP8_ROWS(gemm_fp8_rows_32, 4, 1, 4, 512)
GEMM_FP8_ROWS(gemm_fp8_rows_64, 8, 2, 2, 256)
GEMM_FP8_ROWS(gemm_fp8_rows_32_u8, 4, 1, 8, 512)
GEMM_FP8_ROWS(gemm_fp8_rows_64_r1, 8, 1, 4, 256)

// ---------------------------------------------------------------------------------------------
// Split-K reduction: y[i] (+)= Σ_s part[s][i] over `splits` partial products of mn elements each
// (a GEMM whose K was cut into slices, each slice's product written apart). mode 0: y bf16;
// 1: y f32; 2: y f32 += (the residual add). Four elements a thread; mn % 4 == 0.
extern "C" __global__ void splitk_reduce(const float* part, void* y, u64 mn, int splits, int mode) {
    const u64 i = (blockIdx.x * (u64)blockDim.x + threadIdx.x) * 4;
    if (i >= mn) return;
    float4 a = *(const float4*)(part + i);
    for (int s = 1; s < splits; s++) {
        const float4 b = *(const float4*)(part + (u64)s * mn + i);
        a.x += b.x;
        a.y += b.y;
        a.z += b.z;
        a.w += b.w;
    }
    if (mode == 0) {
        uint2 o;
        o.x = pack_bf2(a.x, a.y);
        o.y = pack_bf2(a.z, a.w);
        *(uint2*)((bf16*)y + i) = o;
    } else {
        float4* yo = (float4*)((float*)y + i);
        if (mode == 2) {
            const float4 r = *yo;
            a.x += r.x;
            a.y += r.y;
            a.z += r.z;
            a.w += r.w;
        }
        *yo = a;
    }
}

// ---------------------------------------------------------------------------------------------
// Sampling on the device. One block of 1024 threads per row of f32 logits.

// Greedy: the index of the largest logit (lowest index on ties). A row whose `masked` flag is
// set draws only among the tokens its bitmask allows (structured output: bit j % 32 of word
// j / 32 of the row's `words` words); other rows read no mask at all.
extern "C" __global__ void argmax_rows(const float* logits, int vocab, const unsigned* mask, const int* masked, int words, int* out) {
    pdl_wait();
    __shared__ float bv[32];
    __shared__ int bi[32];
    const float* row = logits + (u64)blockIdx.x * vocab;
    const unsigned* m = masked[blockIdx.x] ? mask + (u64)blockIdx.x * words : nullptr;
    float best = NEG_INF;
    int idx = 0x7fffffff;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        if (m && !((m[j >> 5] >> (j & 31)) & 1u)) continue;
        float v = row[j];
        if (v > best) { best = v; idx = j; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, best, o);
        int oi = __shfl_xor_sync(0xffffffffu, idx, o);
        if (ov > best || (ov == best && oi < idx)) { best = ov; idx = oi; }
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { bv[warp] = best; bi[warp] = idx; }
    __syncthreads();
    if (warp == 0) {
        int nw = blockDim.x >> 5;
        best = lane < nw ? bv[lane] : NEG_INF;
        idx = lane < nw ? bi[lane] : 0x7fffffff;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, best, o);
            int oi = __shfl_xor_sync(0xffffffffu, idx, o);
            if (ov > best || (ov == best && oi < idx)) { best = ov; idx = oi; }
        }
        if (lane == 0) out[blockIdx.x] = idx == 0x7fffffff ? 0 : idx;
    }
}

// Temperature / top-k / top-p / min-p sampling. params per row (8 floats):
//   [temperature, top_p, min_p, top_k (as float, 0 = off), seed_lo, seed_hi, counter, unused]
// seed and counter are 32-bit integers stored bitwise. The kept set is {i : e_i ≥ τ} with
// e_i = exp((logit_i − max)/T); τ is found by bisection on e (top-k: the largest τ keeping at
// least k tokens; top-p: the largest τ whose kept mass reaches p of the total), then one token is
// drawn from the kept set in proportion to e_i with a counter-based random number.
__device__ __forceinline__ float sample_e(const float* row, int j, float mx, float inv_t) {
    return __expf((row[j] - mx) * inv_t);
}

extern "C" __global__ void __launch_bounds__(1024) sample_rows(const float* logits, int vocab, const float* params,
                                                               int* out) {
    __shared__ float scratch[32];
    __shared__ float prefix[1024];
    const float* row = logits + (u64)blockIdx.x * vocab;
    const float* p = params + 8 * blockIdx.x;
    const float temp = p[0], top_p = p[1], min_p = p[2];
    const int top_k = (int)p[3];
    const u32 seed_lo = __float_as_uint(p[4]), seed_hi = __float_as_uint(p[5]), counter = __float_as_uint(p[6]);
    if (!(temp > 0.f)) {
        // Greedy rows never reach here in practice; fall back to the first maximum.
        float best = NEG_INF;
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) best = fmaxf(best, row[j]);
        best = block_max(best, scratch);
        int idx = 0x7fffffff;
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) if (row[j] == best) { idx = min(idx, j); }
        __shared__ int first;
        if (threadIdx.x == 0) first = 0x7fffffff;
        __syncthreads();
        atomicMin(&first, idx);
        __syncthreads();
        if (threadIdx.x == 0) out[blockIdx.x] = first == 0x7fffffff ? 0 : first;
        return;
    }
    const float inv_t = 1.f / temp;
    float mx = NEG_INF;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) mx = fmaxf(mx, row[j]);
    mx = block_max(mx, scratch);

    float tau = fmaxf(min_p, 0.f);   // e of the maximum is 1, so min-p is a threshold on e
    if (top_k > 0 && top_k < vocab) {
        float lo = 0.f, hi = 1.f;
        for (int it = 0; it < 30; it++) {
            float mid = 0.5f * (lo + hi);
            float c = 0.f;
            for (int j = threadIdx.x; j < vocab; j += blockDim.x) c += sample_e(row, j, mx, inv_t) >= mid ? 1.f : 0.f;
            c = block_sum(c, scratch);
            if (c >= (float)top_k) lo = mid; else hi = mid;
        }
        tau = fmaxf(tau, lo);
    }
    if (top_p < 1.f) {
        float total = 0.f;
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
            float e = sample_e(row, j, mx, inv_t);
            total += e >= tau ? e : 0.f;
        }
        total = block_sum(total, scratch);
        float lo = tau, hi = 1.f;
        for (int it = 0; it < 30; it++) {
            float mid = 0.5f * (lo + hi);
            float mass = 0.f;
            for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
                float e = sample_e(row, j, mx, inv_t);
                mass += e >= mid ? e : 0.f;
            }
            mass = block_sum(mass, scratch);
            if (mass >= top_p * total) lo = mid; else hi = mid;
        }
        tau = fmaxf(tau, lo);
    }
    // Contiguous chunk per thread, so a prefix over threads orders the vocabulary.
    const int chunk = (vocab + blockDim.x - 1) / blockDim.x;
    const int j0 = threadIdx.x * chunk, j1 = min(vocab, j0 + chunk);
    float mine = 0.f;
    for (int j = j0; j < j1; j++) {
        float e = sample_e(row, j, mx, inv_t);
        mine += e >= tau ? e : 0.f;
    }
    prefix[threadIdx.x] = mine;
    __syncthreads();
    // Inclusive scan (Hillis–Steele) over the 1024 partial sums.
    for (int o = 1; o < blockDim.x; o <<= 1) {
        float add = threadIdx.x >= o ? prefix[threadIdx.x - o] : 0.f;
        __syncthreads();
        prefix[threadIdx.x] += add;
        __syncthreads();
    }
    const float total = prefix[blockDim.x - 1];
    u64 h = mix64(((u64)seed_hi << 32 | seed_lo) ^ mix64((u64)counter + 0x5851f42d4c957f2dull));
    const float target = unit_float(h) * total;
    const float before = threadIdx.x > 0 ? prefix[threadIdx.x - 1] : 0.f;
    __shared__ int chosen;
    if (threadIdx.x == 0) chosen = -1;
    __syncthreads();
    if (target >= before && target < prefix[threadIdx.x] && mine > 0.f) {
        float run = before;
        int pick = -1;
        for (int j = j0; j < j1; j++) {
            float e = sample_e(row, j, mx, inv_t);
            if (e >= tau) {
                pick = j;
                run += e;
                if (target < run) break;
            }
        }
        atomicMax(&chosen, pick);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int c = chosen;
        if (c < 0) {
            // Rounding pushed the target past the last kept token: take the largest logit.
            c = 0;
            for (int j = 0; j < vocab; j++) if (row[j] == mx) { c = j; break; }
        }
        out[blockIdx.x] = c;
    }
}

// Checksums of KV blocks where they lie (tandem_protocol::device_checksum): block b is the
// `words` 64-bit words at base + offsets[b]; each word is mixed with its position and the terms
// summed (any order gives the same sum), then the sum mixed with the word count. One block of
// threads per KV block.
__device__ __forceinline__ u64 sum_mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

extern "C" __global__ void __launch_bounds__(1024) block_checksum(u64 base, const u64* offsets, u64 words, u64* out) {
    __shared__ u64 part[32];
    const u64* w = (const u64*)(base + offsets[blockIdx.x]);
    u64 sum = 0;
    for (u64 i = threadIdx.x; i < words; i += blockDim.x) sum += sum_mix64(w[i] ^ (i * 0x9e3779b97f4a7c15ull));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) part[warp] = sum;
    __syncthreads();
    if (warp == 0) {
        sum = lane < (int)(blockDim.x >> 5) ? part[lane] : 0;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        if (lane == 0) out[blockIdx.x] = sum_mix64(sum ^ words);
    }
}
