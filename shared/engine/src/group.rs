//! The shared-memory all-reduce of a CPU tensor-parallel group whose ranks are threads.
//!
//! Each rank hands in its partial sum; the last to arrive adds the parts in rank order and wakes
//! the others, who all read the same total. Adding in a fixed order makes the total the same on
//! every rank and the same from one run to the next, whichever thread arrives first. A rank that
//! fails abandons the group, and every rank waiting on it, or arriving later, gets an error
//! instead of waiting forever.

use std::sync::{Arc, Condvar, Mutex};

use crate::{EngineError, Result};

/// The message of the error a rank gets when another rank of its group failed.
pub(crate) const ABANDONED: &str = "another rank of the tensor-parallel group failed";

pub(crate) struct AllReduce {
    size: usize,
    state: Mutex<State>,
    woken: Condvar,
}

struct State {
    parts: Vec<Option<Vec<f32>>>,
    arrived: usize,
    /// Rounds completed; a waiter is done when it moves on.
    round: u64,
    total: Arc<Vec<f32>>,
    abandoned: bool,
}

/// One rank's handle on the group.
pub(crate) struct Member<'a> {
    group: &'a AllReduce,
    rank: usize,
}

impl AllReduce {
    pub fn new(size: usize) -> Self {
        let state = State { parts: vec![None; size], arrived: 0, round: 0, total: Arc::new(Vec::new()), abandoned: false };
        Self { size, state: Mutex::new(state), woken: Condvar::new() }
    }

    pub fn member(&self, rank: usize) -> Member<'_> {
        assert!(rank < self.size, "rank {rank} of a group of {}", self.size);
        Member { group: self, rank }
    }
}

impl Member<'_> {
    /// The element-wise sum of every rank's `part` (all of the same length).
    pub fn all_reduce(&self, part: Vec<f32>) -> Result<Vec<f32>> {
        let g = self.group;
        let abandoned = || EngineError::Device(ABANDONED.into());
        let mut s = g.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.abandoned {
            return Err(abandoned());
        }
        s.parts[self.rank] = Some(part);
        s.arrived += 1;
        if s.arrived == g.size {
            let mut parts = s.parts.iter_mut().map(|p| p.take().expect("every rank handed in its part"));
            let mut total = parts.next().expect("a group has a rank");
            for p in parts {
                if p.len() != total.len() {
                    s.abandoned = true;
                    g.woken.notify_all();
                    return Err(EngineError::Device(format!("all-reduce of parts of {} and {} elements", total.len(), p.len())));
                }
                for (t, v) in total.iter_mut().zip(&p) {
                    *t += v;
                }
            }
            s.total = Arc::new(total);
            s.arrived = 0;
            s.round += 1;
            g.woken.notify_all();
            return Ok(s.total.to_vec());
        }
        let round = s.round;
        let s = g.woken.wait_while(s, |s| s.round == round && !s.abandoned).unwrap_or_else(|p| p.into_inner());
        if s.round == round {
            return Err(abandoned());
        }
        // The next round cannot finish without this rank, so the total is still this round's.
        Ok(s.total.to_vec())
    }

    /// Marks the group failed and wakes every waiting rank.
    pub fn abandon(&self) {
        let mut s = self.group.state.lock().unwrap_or_else(|p| p.into_inner());
        s.abandoned = true;
        self.group.woken.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rank_gets_the_same_sum_round_after_round() {
        let group = AllReduce::new(3);
        let sums: Vec<Vec<Vec<f32>>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|r| {
                    let m = group.member(r);
                    s.spawn(move || (0..50).map(|round| m.all_reduce(vec![(r * 100 + round) as f32, 1.0]).unwrap()).collect::<Vec<_>>())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for round in 0..50 {
            let want = vec![(300 + 3 * round) as f32, 3.0];
            for rank in &sums {
                assert_eq!(rank[round], want, "round {round}");
            }
        }
    }

    #[test]
    fn a_failed_rank_releases_the_others() {
        let group = AllReduce::new(3);
        let results: Vec<Result<Vec<f32>>> = std::thread::scope(|s| {
            let waiting: Vec<_> = (0..2)
                .map(|r| {
                    let m = group.member(r);
                    s.spawn(move || m.all_reduce(vec![1.0]))
                })
                .collect();
            std::thread::sleep(std::time::Duration::from_millis(20));
            group.member(2).abandon();
            waiting.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(results.iter().all(|r| matches!(r, Err(EngineError::Device(m)) if m == ABANDONED)));
        assert!(group.member(0).all_reduce(vec![1.0]).is_err(), "an abandoned group stays abandoned");
    }
}
