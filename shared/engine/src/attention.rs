//! CPU attention over the paged KV cache, plus the per-token pieces around it (RoPE, q/k norm).
//! Plain loops over f32 slices: every sequence of the batch sits at its own position and reads
//! its keys through its own block table.

use rayon::prelude::*;

use crate::kv::{BlockId, KvCache};

/// Where one query token reads its keys from.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueryCtx<'a> {
    /// Position of the token; it attends to positions `0..=pos`.
    pub pos: usize,
    pub blocks: &'a [BlockId],
}

/// Rotates each head of `x` (`[tokens][heads][head_dim]`) by its token's position.
pub(crate) fn apply_rope(x: &mut [f32], heads: usize, head_dim: usize, positions: &[usize], inv_freq: &[f32], interleaved: bool) {
    let half = head_dim / 2;
    let tok = heads * head_dim;
    x.par_chunks_mut(tok).zip(positions.par_iter()).for_each(|(row, &pos)| {
        let (cos, sin): (Vec<f32>, Vec<f32>) = inv_freq
            .iter()
            .map(|f| {
                let a = pos as f32 * f;
                (a.cos(), a.sin())
            })
            .unzip();
        for h in row.chunks_mut(head_dim) {
            for i in 0..half {
                let (a, b) = if interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
                let (x0, x1) = (h[a], h[b]);
                h[a] = x0 * cos[i] - x1 * sin[i];
                h[b] = x0 * sin[i] + x1 * cos[i];
            }
        }
    });
}

/// RMS-normalises every head of `x` with a shared weight (Qwen3's q/k norm).
pub(crate) fn head_rms_norm(x: &mut [f32], head_dim: usize, weight: &[f32], eps: f64) {
    x.par_chunks_mut(head_dim).for_each(|h| {
        let ms = h.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>() / head_dim as f64;
        let scale = (1.0 / (ms + eps).sqrt()) as f32;
        for (v, w) in h.iter_mut().zip(weight) {
            *v = *v * scale * w;
        }
    });
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums let the compiler vectorise the loop.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Causal attention of every query against its sequence's cached keys and values at `layer`.
/// `q` is `[tokens][heads][head_dim]`; the result has the same shape.
pub(crate) fn paged_attention(
    q: &[f32],
    queries: &[QueryCtx<'_>],
    store: &KvCache,
    layer: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Vec<f32> {
    let group = heads / kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let bs = store.block_size;
    let data = store.data();
    let mut out = vec![0f32; q.len()];
    out.par_chunks_mut(head_dim).enumerate().for_each(|(i, o)| {
        let (t, h) = (i / heads, i % heads);
        let ctx = queries[t];
        let qh = &q[i * head_dim..(i + 1) * head_dim];
        let kv_off = (h / group) * head_dim;
        let n = ctx.pos + 1;
        let mut scores = Vec::with_capacity(n);
        let mut max = f32::NEG_INFINITY;
        for j in 0..n {
            let k = store.offset(ctx.blocks[j / bs], layer, 0, j % bs) + kv_off;
            let s = dot(qh, &data[k..k + head_dim]) * scale;
            max = max.max(s);
            scores.push(s);
        }
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        for (j, p) in scores.iter().enumerate() {
            let v = store.offset(ctx.blocks[j / bs], layer, 1, j % bs) + kv_off;
            let w = p * inv;
            for (o, x) in o.iter_mut().zip(&data[v..v + head_dim]) {
                *o += w * x;
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention through scattered blocks equals attention over the same keys stored in order.
    #[test]
    fn paged_layout_does_not_change_the_result() {
        let (heads, kv_heads, d, bs) = (4, 2, 8, 4);
        let mut store = KvCache::new(8, bs, 1, kv_heads, d);
        let n = 11;
        let val = |i: usize| ((i * 7919) % 101) as f32 / 50.0 - 1.0;
        let keys: Vec<Vec<f32>> = (0..n).map(|t| (0..kv_heads * d).map(|c| val(t * 31 + c)).collect()).collect();
        let vals: Vec<Vec<f32>> = (0..n).map(|t| (0..kv_heads * d).map(|c| val(t * 17 + c + 5)).collect()).collect();
        let scattered: Vec<BlockId> = vec![5, 2, 7];
        let ordered: Vec<BlockId> = vec![0, 1, 3];
        for t in 0..n {
            store.write(scattered[t / bs], 0, t % bs, &keys[t], &vals[t]);
            store.write(ordered[t / bs], 0, t % bs, &keys[t], &vals[t]);
        }
        let q: Vec<f32> = (0..heads * d).map(|c| val(c * 3 + 1)).collect();
        let a = paged_attention(&q, &[QueryCtx { pos: n - 1, blocks: &scattered }], &store, 0, heads, kv_heads, d);
        let b = paged_attention(&q, &[QueryCtx { pos: n - 1, blocks: &ordered }], &store, 0, heads, kv_heads, d);
        assert_eq!(a, b);
        // Reference: softmax(q·k) v for head 3 (kv head 1), written out directly.
        let h = 3;
        let qh = &q[h * d..(h + 1) * d];
        let s: Vec<f32> = keys.iter().map(|k| dot(qh, &k[d..2 * d]) / (d as f32).sqrt()).collect();
        let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f32 = e.iter().sum();
        for c in 0..d {
            let want: f32 = (0..n).map(|t| e[t] / z * vals[t][d + c]).sum();
            assert!((a[h * d + c] - want).abs() < 1e-5);
        }
    }

    #[test]
    fn rope_at_position_zero_is_identity() {
        let mut x: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let orig = x.clone();
        apply_rope(&mut x, 2, 8, &[0], &[1.0, 0.1, 0.01, 0.001], false);
        assert_eq!(x, orig);
    }
}
