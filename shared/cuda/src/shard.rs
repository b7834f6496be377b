//! Tensor-parallel slicing of weights: which part of each matrix rank `r` of `n` holds.
//! Column-parallel layers (Q, K, V, gate, up) split their output rows by whole heads or equal
//! row ranges; row-parallel layers (O, down) split their input columns the same way, and their
//! partial outputs are summed across ranks (an all-reduce) after the GEMM. The engine runs one
//! rank today (`Tp::SINGLE`); loading goes through these functions so a TP group only adds the
//! all-reduce.

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

#[cfg(test)]
mod tests {
    use super::*;

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
