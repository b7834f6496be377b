//! Tensor-parallel slicing of weights: which part of each matrix rank `r` of `n` holds.
//! Column-parallel layers (Q, K, V, gate, up) split their output rows by whole heads or equal
//! row ranges; row-parallel layers (O, down) split their input columns the same way, and their
//! partial outputs are summed across ranks (an all-reduce) after the GEMM.
//!
//! A rank's KV block holds its own heads of every row; [`gather_rows`] and [`scatter_rows`] turn
//! the ranks' blocks into the whole model's block and back (rank order is head order).

use std::ops::Range;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tp {
    pub rank: usize,
    pub size: usize,
}

impl Tp {
    pub const SINGLE: Tp = Tp { rank: 0, size: 1 };

    /// The rank's share of `n` equal units (heads, FFN rows); `None` if they do not divide.
    pub fn share(&self, n: usize) -> Option<Range<usize>> {
        if self.size == 0 || !n.is_multiple_of(self.size) {
            return None;
        }
        let per = n / self.size;
        Some(self.rank * per..(self.rank + 1) * per)
    }
}

/// Rows `rows` of a row-major `[_, cols]` matrix.
pub fn take_rows(m: &[f32], cols: usize, rows: Range<usize>) -> Vec<f32> {
    m[rows.start * cols..rows.end * cols].to_vec()
}

/// Columns `cs` of a row-major `[rows, cols]` matrix.
pub fn take_cols(m: &[f32], cols: usize, cs: Range<usize>) -> Vec<f32> {
    m.chunks_exact(cols).flat_map(|row| row[cs.clone()].iter().copied()).collect()
}

/// The whole-model block from the ranks' blocks: row `i` of the result is row `i` of each part,
/// in rank order. Every part has `rows` equal rows.
pub fn gather_rows(parts: &[Vec<u8>], rows: usize) -> Vec<u8> {
    let total: usize = parts.iter().map(Vec::len).sum();
    let mut out = Vec::with_capacity(total);
    for i in 0..rows {
        for p in parts {
            let w = p.len() / rows;
            out.extend_from_slice(&p[i * w..(i + 1) * w]);
        }
    }
    out
}

/// Splits a whole-model block of `rows` rows into `parts` equal column shares of each row.
pub fn scatter_rows(whole: &[u8], parts: usize, rows: usize) -> Vec<Vec<u8>> {
    let w = whole.len() / rows / parts;
    let mut out = vec![Vec::with_capacity(w * rows); parts];
    for row in whole.chunks_exact(w * parts) {
        for (p, part) in out.iter_mut().enumerate() {
            part.extend_from_slice(&row[p * w..(p + 1) * w]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_rows_gather_and_scatter_by_rank() {
        // 3 rows of 4 heads of 2 bytes; 2 ranks of 2 heads each.
        let whole: Vec<u8> = (0..24).collect();
        let parts = scatter_rows(&whole, 2, 3);
        assert_eq!(parts[0], vec![0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19]);
        assert_eq!(parts[1], vec![4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]);
        assert_eq!(gather_rows(&parts, 3), whole);
        for n in [1, 4] {
            assert_eq!(gather_rows(&scatter_rows(&whole, n, 3), 3), whole, "{n} ranks");
        }
    }

    #[test]
    fn shards_of_every_rank_reassemble_the_matrix() {
        let (rows, cols) = (8, 6);
        let m: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        for size in [1, 2] {
            let mut by_rows = Vec::new();
            let mut by_cols = vec![Vec::new(); rows];
            for rank in 0..size {
                let tp = Tp { rank, size };
                by_rows.extend(take_rows(&m, cols, tp.share(rows).unwrap()));
                let part = take_cols(&m, cols, tp.share(cols).unwrap());
                let w = cols / size;
                for (r, chunk) in part.chunks_exact(w).enumerate() {
                    by_cols[r].extend_from_slice(chunk);
                }
            }
            assert_eq!(by_rows, m);
            assert_eq!(by_cols.concat(), m);
        }
        assert_eq!(Tp { rank: 1, size: 4 }.share(8), Some(2..4));
        assert_eq!(Tp { rank: 0, size: 3 }.share(8), None);
    }
}
