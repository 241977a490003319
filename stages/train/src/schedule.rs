//! The learning-rate schedule: linear warmup, then linear or cosine decay.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    Linear,
    Cosine,
}

impl Decay {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "linear" => Some(Decay::Linear),
            "cosine" => Some(Decay::Cosine),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub peak: f64,
    /// The floor decay ends at.
    pub min: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub decay: Decay,
}

impl LrSchedule {
    /// The rate for optimizer step `step` (0-based): rises linearly to `peak` over
    /// `warmup_steps`, reaching it at the last warmup step, then decays to `min` at the last step.
    pub fn at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let factor = match self.decay {
            Decay::Linear => 1.0 - progress,
            Decay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        };
        self.min + (self.peak - self.min) * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        let s = LrSchedule {
            peak: 2e-4,
            min: 0.0,
            warmup_steps: 10,
            total_steps: 100,
            decay: Decay::Linear,
        };
        assert!((s.at(0) - 2e-5).abs() < 1e-12);
        assert!((s.at(9) - 2e-4).abs() < 1e-12);
        assert!((s.at(10) - 2e-4).abs() < 1e-12);
        assert!((s.at(55) - 1e-4).abs() < 1e-12);
        assert!(s.at(99) > 0.0 && s.at(99) < 1e-5);
        let c = LrSchedule {
            decay: Decay::Cosine,
            min: 1e-5,
            ..s
        };
        assert!((c.at(55) - (1e-5 + 0.5 * 1.9e-4)).abs() < 1e-12);
        assert!((c.at(100) - 1e-5).abs() < 1e-15);
        assert_eq!(Decay::parse("cosine"), Some(Decay::Cosine));
        assert_eq!(Decay::parse("step"), None);
    }
}
