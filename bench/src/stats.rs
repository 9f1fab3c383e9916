//! Samples of one measured operation and the figures drawn from them.

use std::time::Duration;

/// The timings of one operation, one sample per segment (per round).
#[derive(Debug, Clone)]
pub struct Series {
    /// What was timed, as shown in the table.
    pub label: String,
    /// Milliseconds, one per call.
    pub ms: Vec<f64>,
    /// What each sample was (segment, position in the interleaved loop),
    /// parallel to `ms`, for the raw CSV.
    pub tags: Vec<String>,
}

impl Series {
    /// An empty series.
    pub fn new(label: impl Into<String>) -> Series {
        Series { label: label.into(), ms: Vec::new(), tags: Vec::new() }
    }

    /// Adds one sample, with a note on what it was.
    pub fn push(&mut self, d: Duration, tag: String) {
        self.ms.push(d.as_secs_f64() * 1000.0);
        self.tags.push(tag);
    }

    /// The samples as CSV lines: `label,tag,ms`.
    pub fn csv(&self) -> String {
        self.ms.iter().zip(&self.tags).map(|(ms, tag)| format!("\"{}\",{tag},{ms:.3}\n", self.label)).collect()
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v = self.ms.clone();
        v.sort_by(f64::total_cmp);
        v
    }

    /// The median (mean of the two middle samples for an even count); NaN
    /// when there are no samples.
    pub fn median(&self) -> f64 {
        let v = self.sorted();
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }

    /// The 90th percentile, nearest-rank; NaN when there are no samples.
    pub fn p90(&self) -> f64 {
        let v = self.sorted();
        if v.is_empty() {
            return f64::NAN;
        }
        // Nearest rank: the smallest sample with at least 90% at or below it.
        let rank = (v.len() * 9).div_ceil(10).max(1);
        v[rank - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_p90() {
        let mut s = Series::new("x");
        for ms in [5u64, 1, 4, 2, 3, 10, 9, 8, 7, 6] {
            s.push(Duration::from_millis(ms), String::new());
        }
        assert!((s.median() - 5.5).abs() < 1e-9);
        assert!((s.p90() - 9.0).abs() < 1e-9);
        assert!(Series::new("empty").median().is_nan());
    }
}
