//! CUDA devices the scheduler may hand out, one stage per device at a time.

use std::process::Command;

use serde::Serialize;

/// One CUDA device as `CUDA_VISIBLE_DEVICES` names it: an index (`3`), a GPU UUID (`GPU-…`)
/// or a MIG instance (`MIG-…`). Handed to a stage exactly as given: turning a UUID into a
/// position would make CUDA read it as a physical index, outside the job's allocation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Device(String);

/// Indexes in numeric order, then UUIDs: devices go back to the free list in a stable order.
impl Ord for Device {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let rank = |d: &Device| {
            (
                d.0.parse::<u32>().map_or(1, |_| 0),
                d.0.parse::<u32>().unwrap_or(0),
            )
        };
        rank(self)
            .cmp(&rank(other))
            .then_with(|| self.0.cmp(&other.0))
    }
}

impl PartialOrd for Device {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Device {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `CUDA_VISIBLE_DEVICES` for a list of devices.
    pub fn visible(devices: &[Device]) -> String {
        devices
            .iter()
            .map(Device::as_str)
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which GPUs to use.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum GpuSpec {
    /// `CUDA_VISIBLE_DEVICES` when set, else what `nvidia-smi` lists.
    #[default]
    Auto,
    /// `--gpus none`: every stage runs on the CPU.
    None,
    /// `--gpus 0,1,3` (or UUIDs: `--gpus GPU-…,MIG-…`).
    List(Vec<Device>),
}

impl GpuSpec {
    /// Parses `--gpus`: `auto`, `none`, or a comma-separated list of device indexes or UUIDs.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.trim() {
            "auto" => Ok(GpuSpec::Auto),
            "none" | "" => Ok(GpuSpec::None),
            list => list
                .split(',')
                .map(|d| {
                    let d = d.trim();
                    valid_device(d)
                        .then(|| Device(d.to_string()))
                        .ok_or_else(|| format!("`{d}` is not a device index or a GPU-/MIG- UUID"))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(GpuSpec::List),
        }
    }

    /// The devices to hand out, each once, as `CUDA_VISIBLE_DEVICES` names them.
    pub fn resolve(&self) -> Vec<Device> {
        let devices = match self {
            GpuSpec::None => Vec::new(),
            GpuSpec::List(ids) => ids.clone(),
            GpuSpec::Auto => match std::env::var("CUDA_VISIBLE_DEVICES") {
                Ok(v) => parse_visible(&v),
                Err(_) => nvidia_smi_count()
                    .map(|n| (0..n).map(|i| Device(i.to_string())).collect())
                    .unwrap_or_default(),
            },
        };
        // `0,1,0` is devices 0 and 1: a repeated id anywhere would book a device twice.
        let mut seen = std::collections::HashSet::new();
        devices
            .into_iter()
            .filter(|d| seen.insert(d.clone()))
            .collect()
    }
}

fn valid_device(d: &str) -> bool {
    d.parse::<u32>().is_ok()
        || ((d.starts_with("GPU-") || d.starts_with("MIG-"))
            && d.len() > 4
            && d.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-/_".contains(c)))
}

/// `CUDA_VISIBLE_DEVICES` as devices, each entry as given. CUDA stops reading the list at the
/// first invalid entry (`-1` hides every device), and so does this.
fn parse_visible(value: &str) -> Vec<Device> {
    value
        .split(',')
        .map(str::trim)
        .take_while(|e| valid_device(e))
        .map(|e| Device(e.to_string()))
        .collect()
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

    fn ids(devices: &[Device]) -> Vec<&str> {
        devices.iter().map(Device::as_str).collect()
    }

    #[test]
    fn parses_lists_and_words() {
        let GpuSpec::List(list) = GpuSpec::parse("0,1,3").unwrap() else {
            panic!("a list");
        };
        assert_eq!(ids(&list), ["0", "1", "3"]);
        assert_eq!(GpuSpec::parse("none").unwrap(), GpuSpec::None);
        assert!(GpuSpec::parse("0,x").is_err());
        assert_eq!(ids(&parse_visible("2,3")), ["2", "3"]);
        assert_eq!(ids(&parse_visible("")), Vec::<&str>::new());
        assert_eq!(ids(&parse_visible("-1")), Vec::<&str>::new());
    }

    #[test]
    fn uuids_and_mig_instances_pass_through_unchanged() {
        let visible =
            "GPU-8f6f2b1e-77a1-4c1e-9c55-0d2c3e4f5a6b,MIG-1d2e3f4a-5b6c-7d8e-9f00-112233445566";
        let devices = parse_visible(visible);
        assert_eq!(
            Device::visible(&devices),
            visible,
            "never turned into positions"
        );
        assert_eq!(
            Device::visible(&devices[1..]),
            visible.split(',').nth(1).unwrap()
        );
        let GpuSpec::List(list) = GpuSpec::parse("GPU-abc,MIG-def").unwrap() else {
            panic!("a list");
        };
        assert_eq!(ids(&list), ["GPU-abc", "MIG-def"]);
    }

    #[test]
    fn a_repeated_device_is_booked_once() {
        let spec = GpuSpec::parse("0,1,0").unwrap();
        assert_eq!(ids(&spec.resolve()), ["0", "1"]);
    }
}
