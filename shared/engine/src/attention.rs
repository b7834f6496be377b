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

/// A plain dot product, for the tests' reference attention.
#[cfg(test)]
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

/// `eˣ` to about 2e-7 relative, written so that loops over slices vectorise: `x = n·ln 2 + r`
/// with `|r| ≤ ln 2 / 2`, `eʳ` by its Taylor polynomial of degree 7, `2ⁿ` built in the exponent
/// bits. Below −87 (and for −∞, a masked score) it is exactly 0.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let xc = x.clamp(-87.0, 88.0);
    let n = (xc * LOG2_E + 0.5).floor();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, xc));
    let mut p: f32 = 1.0 / 5040.0;
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p.mul_add(r, c);
    }
    // 2ⁿ from the exponent bits: n + 127 (1 to 254 after the clamp) lands in the low mantissa
    // bits of 2²³ + n + 127, a bit cast rather than a float-to-integer conversion, so it
    // vectorises.
    let scale = f32::from_bits((n + (127.0 + 8_388_608.0)).to_bits() << 23);
    if x < -87.0 {
        0.0
    } else {
        p * scale
    }
}

/// Query tokens of one sequence taken together: they share every key block they read.
const QUERY_TILE: usize = 16;

/// Causal attention of every query against its sequence's cached keys and values at `layer`.
/// `q` is `[tokens][heads][head_dim]`; the result has the same shape.
///
/// The work is cut into (run of up to [`QUERY_TILE`] consecutive tokens of one sequence, KV
/// head) items, shared out over rayon's threads. An item's query rows (its tokens times the
/// query heads of its KV head) read each key block once, a block at a time, with the softmax
/// computed online (running maximum and sum, the output rescaled when the maximum grows), so no
/// row of scores as long as the context is materialised. The block's keys are transposed first,
/// so each score row is a vector loop over the block's keys, in the same order for every row.
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
    let mut tiles: Vec<std::ops::Range<usize>> = Vec::new();
    for (t, ctx) in queries.iter().enumerate() {
        match tiles.last_mut() {
            Some(tile)
                if tile.len() < QUERY_TILE
                    && queries[tile.start].blocks.as_ptr() == ctx.blocks.as_ptr()
                    && queries[tile.end - 1].pos < ctx.pos =>
            {
                tile.end = t + 1
            }
            _ => tiles.push(t..t + 1),
        }
    }
    let items: Vec<(usize, usize)> = (0..tiles.len()).flat_map(|i| (0..kv_heads).map(move |kh| (i, kh))).collect();
    let results: Vec<Vec<f32>> =
        items.par_iter().map(|&(i, kh)| attend_tile(q, queries, tiles[i].clone(), kh, group, heads, store, layer, head_dim)).collect();
    let mut out = vec![0f32; q.len()];
    for (&(i, kh), rows) in items.iter().zip(&results) {
        for (r, row) in rows.chunks_exact(head_dim).enumerate() {
            let (t, h) = (tiles[i].start + r / group, kh * group + r % group);
            out[(t * heads + h) * head_dim..][..head_dim].copy_from_slice(row);
        }
    }
    out
}

/// One item of [`paged_attention`]: rows `(token, query head)` in that order, `head_dim` each.
#[allow(clippy::too_many_arguments)]
fn attend_tile(
    q: &[f32],
    queries: &[QueryCtx<'_>],
    tokens: std::ops::Range<usize>,
    kh: usize,
    group: usize,
    heads: usize,
    store: &KvCache,
    layer: usize,
    d: usize,
) -> Vec<f32> {
    let scale = 1.0 / (d as f32).sqrt();
    let (bs, row) = (store.block_size, store.row);
    let blocks = queries[tokens.start].blocks;
    // The rows' queries, pre-scaled, and each row's position.
    let mut qs = Vec::with_capacity(tokens.len() * group * d);
    let mut pos = Vec::with_capacity(tokens.len() * group);
    for t in tokens.clone() {
        for h in kh * group..(kh + 1) * group {
            qs.extend(q[(t * heads + h) * d..][..d].iter().map(|v| v * scale));
            pos.push(queries[t].pos);
        }
    }
    let rows = pos.len();
    let last = pos.iter().copied().max().unwrap_or(0);
    // Transposed keys `[d][padded block]`: score rows are computed 16 keys at a time. Every row
    // scores its keys this way, whatever else is in its tile, so a token's attention is the same
    // bit for bit in a prefill chunk and as a decode step.
    let padded = bs.next_multiple_of(16);
    let (mut max, mut sum) = (vec![f32::NEG_INFINITY; rows], vec![0f32; rows]);
    let mut out = vec![0f32; rows * d];
    let mut kt = vec![0f32; d * padded];
    let (mut kf, mut vf) = (vec![0f32; bs * d], vec![0f32; bs * d]);
    let mut scores = vec![0f32; ROW_BATCH * padded];
    for (bi, &block) in blocks.iter().enumerate().take(last / bs + 1) {
        let first = bi * bs;
        let n = bs.min(last + 1 - first);
        let k0 = store.offset(block, layer, 0, 0) + kh * d;
        let v0 = store.offset(block, layer, 1, 0) + kh * d;
        // The next block's keys and values for this head, asked for while this one is worked on.
        if let Some(&next) = blocks.get(bi + 1).filter(|_| last >= first + bs) {
            let nn = bs.min(last + 1 - first - bs);
            store.prefetch(store.offset(next, layer, 0, 0) + kh * d, nn, row, d);
            store.prefetch(store.offset(next, layer, 1, 0) + kh * d, nn, row, d);
        }
        // The block's keys and values for this head, widened to f32 once, keys transposed.
        store.widen(k0, n, row, d, &mut kf);
        store.widen(v0, n, row, d, &mut vf);
        tandem_kernels::transpose(&kf, d, n, d, &mut kt, padded);
        // The rows of one token (its query heads) share their position, so they see the same
        // keys: they go through the block together, up to four at a time, each key and value
        // row loaded once for all of them. Every row's arithmetic is its own and in the same
        // order whichever rows it goes with.
        let mut r0 = 0;
        while r0 < rows {
            let t_end = ((r0 / group + 1) * group).min(rows);
            let r1 = (r0 + ROW_BATCH).min(t_end);
            if pos[r0] >= first {
                // Keys of this block the rows may see.
                let seen = n.min(pos[r0] + 1 - first);
                let rs = r0..r1;
                let (q, o) = (&qs[r0 * d..r1 * d], &mut out[r0 * d..r1 * d]);
                let (m, z) = (&mut max[rs.clone()], &mut sum[rs]);
                let block = KeyBlock { kt: &kt, v: &vf, padded, seen, d };
                match r1 - r0 {
                    4 => block.attend::<4>(q, &mut scores, m, z, o),
                    3 => block.attend::<3>(q, &mut scores, m, z, o),
                    2 => block.attend::<2>(q, &mut scores, m, z, o),
                    _ => block.attend::<1>(q, &mut scores, m, z, o),
                }
            }
            r0 = r1;
        }
    }
    for (o, z) in out.chunks_exact_mut(d).zip(&sum) {
        let inv = 1.0 / z;
        o.iter_mut().for_each(|v| *v *= inv);
    }
    out
}

/// Rows of one token that go through a key block together.
const ROW_BATCH: usize = 4;

/// One key block of one KV head as the rows of a token read it: keys transposed in `kt`
/// (`[d][padded]`), values in `v` (rows of `d`), the first `seen` of them visible.
struct KeyBlock<'a> {
    kt: &'a [f32],
    v: &'a [f32],
    padded: usize,
    seen: usize,
    d: usize,
}

impl KeyBlock<'_> {
    /// `R` query rows (`q`, `R × d`) through the block: scores, the online softmax's running
    /// maximum `max` and sum `sum` updated, and the outputs `out` (`R × d`) rescaled and added
    /// to. `scores` is scratch of at least `R × padded`.
    fn attend<const R: usize>(&self, q: &[f32], scores: &mut [f32], max: &mut [f32], sum: &mut [f32], out: &mut [f32]) {
        let (padded, seen) = (self.padded, self.seen);
        self.score::<R>(q, scores);
        let mut corr = [1f32; R];
        for (i, c) in corr.iter_mut().enumerate() {
            let s = &mut scores[i * padded..][..seen];
            let m = max_of(s, max[i]);
            *c = exp(max[i] - m);
            max[i] = m;
            s.iter_mut().for_each(|v| *v = exp(*v - m));
            sum[i] = sum[i].mul_add(*c, s.iter().sum::<f32>());
        }
        self.weigh::<R>(scores, &corr, out);
    }

    /// Scores of the `R` rows against the visible keys into `scores` (`R × padded`), 16 keys at
    /// a time. Each score is a fused multiply-add chain over the head dimension in order, the
    /// same for every `R`.
    fn score<const R: usize>(&self, q: &[f32], scores: &mut [f32]) {
        let (kt, padded, d) = (self.kt, self.padded, self.d);
        let q: [&[f32]; R] = std::array::from_fn(|i| &q[i * d..][..d]);
        for j0 in (0..self.seen).step_by(16) {
            let mut acc = [[0f32; 16]; R];
            for c in 0..d {
                let k = &kt[c * padded + j0..][..16];
                for (a, qr) in acc.iter_mut().zip(&q) {
                    let qc = qr[c];
                    for i in 0..16 {
                        a[i] = qc.mul_add(k[i], a[i]);
                    }
                }
            }
            for (i, a) in acc.iter().enumerate() {
                scores[i * padded + j0..][..16].copy_from_slice(a);
            }
        }
    }

    /// `out[r] = out[r] · corr[r] + Σⱼ p[r][j] · v[j]` for the `R` rows at once (`p` is
    /// `R × padded`), 16 outputs of every row held in registers while the block's values pass,
    /// each value row loaded once for all the rows.
    fn weigh<const R: usize>(&self, p: &[f32], corr: &[f32; R], out: &mut [f32]) {
        let (v, d) = (self.v, self.d);
        let p: [&[f32]; R] = std::array::from_fn(|i| &p[i * self.padded..][..self.seen]);
        let full = d / 16 * 16;
        for c0 in (0..full).step_by(16) {
            let mut acc = [[0f32; 16]; R];
            for (i, a) in acc.iter_mut().enumerate() {
                for (x, o) in a.iter_mut().zip(&out[i * d + c0..][..16]) {
                    *x = o * corr[i];
                }
            }
            for j in 0..self.seen {
                let vv = &v[j * d + c0..][..16];
                for (a, pr) in acc.iter_mut().zip(&p) {
                    let pj = pr[j];
                    for i in 0..16 {
                        a[i] = pj.mul_add(vv[i], a[i]);
                    }
                }
            }
            for (i, a) in acc.iter().enumerate() {
                out[i * d + c0..][..16].copy_from_slice(a);
            }
        }
        for (i, pr) in p.iter().enumerate() {
            let o = &mut out[i * d + full..(i + 1) * d];
            o.iter_mut().for_each(|x| *x *= corr[i]);
            for (j, &pj) in pr.iter().enumerate() {
                for (x, &vv) in o.iter_mut().zip(&v[j * d + full..]) {
                    *x = pj.mul_add(vv, *x);
                }
            }
        }
    }
}

/// `s`'s largest value and `init`'s, taken in eight lanes so the loop vectorises (a maximum is
/// the same in any order).
fn max_of(s: &[f32], init: f32) -> f32 {
    let mut lanes = [init; 8];
    let chunks = s.chunks_exact(8);
    let tail = chunks.remainder().iter().copied().fold(init, f32::max);
    for c in chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = m.max(v);
        }
    }
    lanes.iter().copied().fold(tail, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_protocol::KvDtype;

    /// Attention through scattered blocks equals attention over the same keys stored in order.
    #[test]
    fn paged_layout_does_not_change_the_result() {
        let (heads, kv_heads, d, bs) = (4, 2, 8, 4);
        let mut store = KvCache::new(8, bs, 1, kv_heads, d, KvDtype::F16);
        let n = 11;
        // Values an f16 cache holds exactly, so the reference below sees what the cache does.
        let val = |i: usize| half::f16::from_f32(((i * 7919) % 101) as f32 / 50.0 - 1.0).to_f32();
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

    /// A prefill of many tokens (tiles of keys transposed), decode tokens of other sequences
    /// (scores as dot products) and a chunk that starts mid-sequence, in one pass, against
    /// softmax(q·k)·v written out per row, with GQA and blocks out of order.
    #[test]
    fn tiled_online_softmax_matches_the_definition() {
        let (heads, kv_heads, d, bs, layers) = (6, 2, 16, 4, 2);
        let mut store = KvCache::new(64, bs, layers, kv_heads, d, KvDtype::F16);
        // Values an f16 cache holds exactly (see above).
        let val = |i: usize| half::f16::from_f32(((i * 7919 + 13) % 211) as f32 / 40.0 - 2.6).to_f32();
        // Three sequences: 37 tokens prefilled, 9 tokens decoded one more, 20 tokens of which the
        // last 6 are this pass's chunk.
        let lens = [37usize, 10, 20];
        let tables: Vec<Vec<BlockId>> = vec![(0..10).map(|b| 63 - 2 * b).collect(), vec![1, 3, 5], vec![20, 4, 30, 2, 12]];
        let mut keys = Vec::new();
        let mut vals = Vec::new();
        for (s, &n) in lens.iter().enumerate() {
            let k: Vec<Vec<f32>> = (0..n).map(|t| (0..kv_heads * d).map(|c| val(s * 1000 + t * 31 + c)).collect()).collect();
            let v: Vec<Vec<f32>> = (0..n).map(|t| (0..kv_heads * d).map(|c| val(s * 3000 + t * 17 + c + 5)).collect()).collect();
            for t in 0..n {
                store.write(tables[s][t / bs], 1, t % bs, &k[t], &v[t]);
            }
            keys.push(k);
            vals.push(v);
        }
        let rows: Vec<(usize, usize)> = (0..37).map(|t| (0, t)).chain([(1, 9)]).chain((14..20).map(|t| (2, t))).collect();
        let queries: Vec<QueryCtx<'_>> = rows.iter().map(|&(s, t)| QueryCtx { pos: t, blocks: &tables[s] }).collect();
        let q: Vec<f32> = (0..rows.len() * heads * d).map(|c| val(c * 3 + 1)).collect();
        let got = paged_attention(&q, &queries, &store, 1, heads, kv_heads, d);
        for (i, &(s, t)) in rows.iter().enumerate() {
            for h in 0..heads {
                let kh = h / (heads / kv_heads);
                let qh = &q[(i * heads + h) * d..][..d];
                let sc: Vec<f32> = (0..=t).map(|j| dot(qh, &keys[s][j][kh * d..(kh + 1) * d]) / (d as f32).sqrt()).collect();
                let m = sc.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = sc.iter().map(|x| (x - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for c in 0..d {
                    let want: f32 = (0..=t).map(|j| e[j] / z * vals[s][j][kh * d + c]).sum();
                    let at = (i * heads + h) * d + c;
                    assert!(
                        (got[at] - want).abs() < 2e-5 * want.abs().max(1.0),
                        "sequence {s} token {t} head {h}: {} against {want}",
                        got[at]
                    );
                }
            }
        }
    }

    #[test]
    fn exp_is_close_to_the_library_one() {
        // From −87 (below it the result is 0, as documented) to 87.
        for i in -1972..=1972 {
            let x = i as f32 * 0.0441;
            let (a, b) = (exp(x), x.exp());
            assert!((a - b).abs() <= 3e-7 * b, "{x}: {a} against {b}");
        }
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
    }

    #[test]
    fn rope_at_position_zero_is_identity() {
        let mut x: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let orig = x.clone();
        apply_rope(&mut x, 2, 8, &[0], &[1.0, 0.1, 0.01, 0.001], false);
        assert_eq!(x, orig);
    }
}
