//! CUDA devices the scheduler may hand out, one stage per device at a time.

use std::process::Command;

/// Which GPUs to use.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum GpuSpec {
    /// `CUDA_VISIBLE_DEVICES` when set, else what `nvidia-smi` lists.
    #[default]
    Auto,
    /// `--gpus none`: every stage runs on the CPU.
    None,
    /// `--gpus 0,1,3`.
    List(Vec<u32>),
}

impl GpuSpec {
    /// Parses `--gpus`: `auto`, `none`, or a comma-separated list of device ids.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.trim() {
            "auto" => Ok(GpuSpec::Auto),
            "none" | "" => Ok(GpuSpec::None),
            list => list
                .split(',')
                .map(|d| {
                    d.trim()
                        .parse::<u32>()
                        .map_err(|_| format!("`{d}` is not a device id"))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(GpuSpec::List),
        }
    }

    /// The device ids, physical as `CUDA_VISIBLE_DEVICES` counts them.
    pub fn resolve(&self) -> Vec<u32> {
        match self {
            GpuSpec::None => Vec::new(),
            GpuSpec::List(ids) => {
                // `0,1,0` is devices 0 and 1: a repeated id anywhere would book a device twice.
                let mut seen = std::collections::HashSet::new();
                ids.iter().copied().filter(|id| seen.insert(*id)).collect()
            }
            GpuSpec::Auto => match std::env::var("CUDA_VISIBLE_DEVICES") {
                Ok(v) => parse_visible(&v),
                Err(_) => nvidia_smi_count()
                    .map(|n| (0..n).collect())
                    .unwrap_or_default(),
            },
        }
    }
}

/// `CUDA_VISIBLE_DEVICES` as ids; UUID entries keep their position.
fn parse_visible(value: &str) -> Vec<u32> {
    let entries: Vec<&str> = value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if entries.iter().all(|e| e.parse::<u32>().is_ok()) {
        entries.iter().filter_map(|e| e.parse().ok()).collect()
    } else {
        (0..entries.len() as u32).collect()
    }
}

fn nvidia_smi_count() -> Option<u32> {
    let out = Command::new("nvidia-smi").arg("-L").output().ok()?;
    if !out.status.success() {
        return None;
    }
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("GPU "))
            .count() as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists_and_words() {
        assert_eq!(
            GpuSpec::parse("0,1,3").unwrap(),
            GpuSpec::List(vec![0, 1, 3])
        );
        assert_eq!(GpuSpec::parse("none").unwrap(), GpuSpec::None);
        assert!(GpuSpec::parse("0,x").is_err());
        assert_eq!(parse_visible("2,3"), vec![2, 3]);
        assert_eq!(parse_visible("GPU-abc,GPU-def"), vec![0, 1]);
        assert_eq!(parse_visible(""), Vec::<u32>::new());
    }

    #[test]
    fn a_repeated_device_is_booked_once() {
        let spec = GpuSpec::parse("0,1,0").unwrap();
        assert_eq!(spec.resolve(), vec![0, 1]);
    }
}
