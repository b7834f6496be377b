//! When requests are sent: Poisson arrivals, or gamma-distributed gaps for burstier or
//! smoother traffic, or everything at once.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Gamma};

use crate::{LoadtestError, Result};

/// Send times as offsets from the start of the run: the first request at zero, then gaps drawn
/// from a gamma distribution with shape `burstiness` and mean `1 / rate`. Shape 1 is the
/// exponential, i.e. Poisson arrivals; the gaps' coefficient of variation is
/// `1 / sqrt(burstiness)`. An infinite rate sends every request at zero.
#[derive(Debug, Clone)]
pub struct Schedule {
    gaps: Option<Gamma<f64>>,
    rng: StdRng,
    next: f64,
}

impl Schedule {
    pub fn new(rate: f64, burstiness: f64, seed: u64) -> Result<Self> {
        if rate.is_nan() || rate <= 0.0 {
            return Err(LoadtestError::Config("request rate must be positive".into()));
        }
        let gaps = if rate.is_infinite() {
            None
        } else {
            let scale = 1.0 / (rate * burstiness);
            Some(Gamma::new(burstiness, scale).map_err(|e| LoadtestError::Config(format!("burstiness {burstiness}: {e}")))?)
        };
        Ok(Self { gaps, rng: StdRng::seed_from_u64(seed), next: 0.0 })
    }
}

impl Iterator for Schedule {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let at = self.next;
        if let Some(gamma) = &self.gaps {
            self.next += gamma.sample(&mut self.rng);
        }
        Some(Duration::from_secs_f64(at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gaps(rate: f64, burstiness: f64, n: usize) -> Vec<f64> {
        seeded_gaps(rate, burstiness, n, 3)
    }

    fn seeded_gaps(rate: f64, burstiness: f64, n: usize, seed: u64) -> Vec<f64> {
        let times: Vec<f64> = Schedule::new(rate, burstiness, seed).unwrap().take(n + 1).map(|d| d.as_secs_f64()).collect();
        times.windows(2).map(|w| w[1] - w[0]).collect()
    }

    /// Kolmogorov–Smirnov statistic: the largest distance between the sample's empirical CDF
    /// and `cdf`.
    fn ks_distance(sample: &[f64], cdf: impl Fn(f64) -> f64) -> f64 {
        let mut sorted = sample.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len() as f64;
        sorted
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let f = cdf(x);
                (f - i as f64 / n).max((i + 1) as f64 / n - f)
            })
            .fold(0.0, f64::max)
    }

    /// CDF of the gamma distribution of integer shape `k` (Erlang) with mean `1 / rate`; `k = 1`
    /// is the exponential.
    fn erlang_cdf(k: u32, rate: f64) -> impl Fn(f64) -> f64 {
        let lambda = rate * f64::from(k);
        move |x| {
            let lx = lambda * x;
            let (mut term, mut sum) = (1.0, 1.0);
            for n in 1..k {
                term *= lx / f64::from(n);
                sum += term;
            }
            1.0 - (-lx).exp() * sum
        }
    }

    #[test]
    fn poisson_gaps_pass_a_kolmogorov_smirnov_test_for_the_exponential() {
        let n = 5000;
        // The statistic's critical value at the 0.1 % level.
        let critical = 1.95 / (n as f64).sqrt();
        for (rate, seed) in [(50.0, 3), (7.0, 11), (1000.0, 29)] {
            let g = seeded_gaps(rate, 1.0, n, seed);
            let d = ks_distance(&g, erlang_cdf(1, rate));
            assert!(d < critical, "rate {rate}: KS distance {d:.4} to Exp({rate}), critical {critical:.4}");
            // The test tells rates 20 % apart.
            let off = ks_distance(&g, erlang_cdf(1, rate * 1.2));
            assert!(off > critical, "rate {rate}: KS distance {off:.4} to Exp({}), should exceed {critical:.4}", rate * 1.2);
        }
        // Burstiness 4 draws gamma gaps of shape 4: they fit that distribution and fail the
        // exponential one of the same mean.
        let g = seeded_gaps(50.0, 4.0, n, 5);
        let fit = ks_distance(&g, erlang_cdf(4, 50.0));
        assert!(fit < critical, "burstiness 4: KS distance {fit:.4} to Gamma(4), critical {critical:.4}");
        let exp = ks_distance(&g, erlang_cdf(1, 50.0));
        assert!(exp > critical, "burstiness 4: KS distance {exp:.4} to the exponential, should exceed {critical:.4}");
    }

    fn mean_cv(x: &[f64]) -> (f64, f64) {
        let mean = x.iter().sum::<f64>() / x.len() as f64;
        let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / x.len() as f64;
        (mean, var.sqrt() / mean)
    }

    #[test]
    fn gaps_have_the_requested_mean_and_spread() {
        for (burstiness, cv) in [(1.0, 1.0), (0.25, 2.0), (4.0, 0.5)] {
            let (mean, got_cv) = mean_cv(&gaps(50.0, burstiness, 20_000));
            assert!((mean - 0.02).abs() < 0.02 * 0.05, "burstiness {burstiness}: mean gap {mean}");
            assert!((got_cv - cv).abs() < cv * 0.1, "burstiness {burstiness}: cv {got_cv}, want {cv}");
        }
    }

    #[test]
    fn infinite_rate_sends_at_once_and_seed_repeats() {
        assert!(Schedule::new(f64::INFINITY, 1.0, 0).unwrap().take(5).all(|d| d.is_zero()));
        let a: Vec<_> = Schedule::new(3.0, 1.0, 9).unwrap().take(10).collect();
        let b: Vec<_> = Schedule::new(3.0, 1.0, 9).unwrap().take(10).collect();
        assert_eq!(a, b);
        assert!(Schedule::new(0.0, 1.0, 0).is_err());
    }
}
