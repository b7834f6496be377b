//! How a tensor-parallel group divides a model's attention heads among its ranks.
//!
//! Every engine and the re-sharding of KV blocks use these functions, so the two sides of a
//! handoff agree on which rank holds which KV head without exchanging a table.
//!
//! - **KV heads.** With `size ≤ kv_heads`, rank `r` holds the contiguous run
//!   `⌊r·kv/size⌋ .. ⌊(r+1)·kv/size⌋`: equal runs when the degree divides the head count, runs
//!   differing by one head otherwise (3 heads over 2 ranks: 1 and 2). With `size > kv_heads`
//!   each rank holds one KV head, `⌊r·kv/size⌋`, and the ranks that share a head each keep a copy
//!   of its keys and values (3 heads over 4 ranks: 0, 0, 1, 2).
//! - **Query heads.** A rank computes the query heads that read its KV heads: all of them when
//!   it holds a KV head alone, an equal-as-possible part of the head's group when it shares it.
//!   A degree above the query head count leaves some rank without work and is refused.

use std::ops::Range;

/// Why a model's heads cannot be divided over a TP degree.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TpError {
    #[error("tensor-parallel degree must be at least 1")]
    Zero,
    #[error("{heads} query heads are not a whole number of groups over {kv_heads} KV heads")]
    Grouping { heads: usize, kv_heads: usize },
    #[error(
        "tensor-parallel degree {size} is too high for this model: {kv_heads} KV heads of {group} query heads each leave some rank \
         without a query head (at most {max} ranks)"
    )]
    TooMany { size: usize, kv_heads: usize, group: usize, max: usize },
}

/// Part `i` of `n` units cut into `parts` runs whose lengths differ by at most one.
pub fn balanced(n: usize, parts: usize, i: usize) -> Range<usize> {
    i * n / parts..(i + 1) * n / parts
}

/// The KV heads rank `rank` of a group of `size` holds (see the module's rules). Total for any
/// input, a layout read off the wire included: the products are taken in 128 bits.
pub fn kv_heads_of_rank(kv_heads: usize, size: usize, rank: usize) -> Range<usize> {
    let (kv, size, rank) = (kv_heads as u128, size.max(1) as u128, rank as u128);
    let at = |r: u128| usize::try_from(r * kv / size).unwrap_or(usize::MAX);
    let start = at(rank);
    start..at(rank + 1).max(start.saturating_add(1))
}

/// The query heads rank `rank` of a group of `size` computes.
pub fn query_heads_of_rank(heads: usize, kv_heads: usize, size: usize, rank: usize) -> Result<Range<usize>, TpError> {
    check_degree(heads, kv_heads, size)?;
    let group = heads / kv_heads;
    let kv = kv_heads_of_rank(kv_heads, size, rank);
    if size <= kv_heads {
        return Ok(kv.start * group..kv.end * group);
    }
    // Ranks sharing KV head `k` are those `r` with ⌊r·kv/size⌋ = k: `first(k) .. first(k+1)`.
    let first = |k: usize| (k * size).div_ceil(kv_heads);
    let (lo, hi) = (first(kv.start), first(kv.start + 1));
    let part = balanced(group, hi - lo, rank - lo);
    Ok(kv.start * group + part.start..kv.start * group + part.end)
}

/// Checks that `size` ranks can each be given at least one query head.
pub fn check_degree(heads: usize, kv_heads: usize, size: usize) -> Result<(), TpError> {
    if size == 0 {
        return Err(TpError::Zero);
    }
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(TpError::Grouping { heads, kv_heads });
    }
    let group = heads / kv_heads;
    // The most ranks one KV head is shared by is ⌈size/kv⌉; each needs a query head of the group.
    let max = kv_heads * group;
    if size > kv_heads && size.div_ceil(kv_heads) > group {
        return Err(TpError::TooMany { size, kv_heads, group, max });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_query_head_is_computed_by_exactly_one_rank_next_to_its_kv_head() {
        for (heads, kv) in [(9, 3), (32, 8), (12, 12), (16, 2), (8, 1), (24, 8), (14, 2)] {
            let group = heads / kv;
            for size in 1..=heads {
                if check_degree(heads, kv, size).is_err() {
                    continue;
                }
                let mut next_q = 0;
                let mut kv_seen = vec![false; kv];
                for r in 0..size {
                    let q = query_heads_of_rank(heads, kv, size, r).unwrap();
                    let k = kv_heads_of_rank(kv, size, r);
                    assert_eq!(q.start, next_q, "{heads}/{kv} over {size}: rank {r} starts where the last ended");
                    assert!(!q.is_empty() && !k.is_empty(), "{heads}/{kv} over {size}: rank {r} has work");
                    next_q = q.end;
                    // The rank's query heads read only its own KV heads.
                    for h in q {
                        assert!(k.contains(&(h / group)), "{heads}/{kv} over {size}: head {h} on rank {r} without its kv head");
                    }
                    for h in k {
                        kv_seen[h] = true;
                    }
                }
                assert_eq!(next_q, heads);
                assert!(kv_seen.iter().all(|&s| s));
            }
        }
    }

    #[test]
    fn uneven_and_shared_cuts_of_the_default_models_heads() {
        // 9 query heads over 3 KV heads.
        assert_eq!([0, 1].map(|r| kv_heads_of_rank(3, 2, r)), [0..1, 1..3]);
        assert_eq!([0, 1].map(|r| query_heads_of_rank(9, 3, 2, r).unwrap()), [0..3, 3..9]);
        assert_eq!([0, 1, 2, 3].map(|r| kv_heads_of_rank(3, 4, r)), [0..1, 0..1, 1..2, 2..3]);
        assert_eq!([0, 1, 2, 3].map(|r| query_heads_of_rank(9, 3, 4, r).unwrap()), [0..1, 1..3, 3..6, 6..9]);
        assert_eq!([5, 6, 7].map(|r| query_heads_of_rank(9, 3, 8, r).unwrap()), [5..6, 6..7, 7..9]);
        assert!(matches!(check_degree(9, 3, 10), Err(TpError::TooMany { max: 9, .. })));
        assert_eq!(check_degree(9, 3, 0), Err(TpError::Zero));
        // Whatever a damaged layout says, no overflow.
        assert!(kv_heads_of_rank(usize::MAX, usize::MAX, usize::MAX).len() <= 1);
        assert_eq!(kv_heads_of_rank(usize::MAX, 1, 0), 0..usize::MAX);
        assert!(matches!(check_degree(9, 2, 1), Err(TpError::Grouping { .. })));
    }
}
