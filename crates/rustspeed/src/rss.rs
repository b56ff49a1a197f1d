//! The process's peak resident set size, for the end-of-training memory report.
//!
//! Linux reports it as `VmHWM` in `/proc/self/status`; where that file is unreadable (or on
//! other Unix systems) `getrusage(RUSAGE_SELF).ru_maxrss` gives a high-water mark that on Linux
//! also covers the image before the last `execve` (the forked parent's pages), so it comes second.

use std::os::raw::{c_int, c_long};

/// Peak resident set size of this process in bytes, `None` where the platform reports none.
pub fn peak_rss_bytes() -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| parse_vm_hwm(&s))
        .or_else(rusage_max_rss)
}

/// `VmHWM:   123456 kB` from a `/proc/<pid>/status` text, in bytes.
pub fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let mut fields = line["VmHWM:".len()..].split_whitespace();
    let value: u64 = fields.next()?.parse().ok()?;
    let unit = match fields.next() {
        Some("kB") | None => 1024,
        Some("mB") => 1024 * 1024,
        Some(_) => return None,
    };
    Some(value * unit)
}

/// `struct rusage`: two `struct timeval` (two longs each on every Unix ABI we build for,
/// padding included) followed by fourteen longs, of which `ru_maxrss` is the first.
#[repr(C)]
struct Rusage {
    fields: [c_long; 18],
}

const RU_MAXRSS: usize = 4;
const RUSAGE_SELF: c_int = 0;

#[cfg(unix)]
extern "C" {
    fn getrusage(who: c_int, usage: *mut Rusage) -> c_int;
}

#[cfg(unix)]
fn rusage_max_rss() -> Option<u64> {
    let mut usage = Rusage { fields: [0; 18] };
    // SAFETY: `usage` is a writable buffer of the size and alignment of `struct rusage`.
    let rc = unsafe { getrusage(RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        return None;
    }
    let max = u64::try_from(usage.fields[RU_MAXRSS]).ok()?;
    // macOS reports bytes, the others kilobytes.
    let unit = if cfg!(target_os = "macos") { 1 } else { 1024 };
    (max > 0).then_some(max * unit)
}

#[cfg(not(unix))]
fn rusage_max_rss() -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vm_hwm_in_kilobytes() {
        let status = "Name:\tcargo\nVmPeak:\t  900 kB\nVmHWM:\t    2048 kB\nVmRSS:\t 1024 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(2048 * 1024));
        assert_eq!(parse_vm_hwm("Name:\tx\n"), None);
        assert_eq!(parse_vm_hwm("VmHWM:\tlots kB\n"), None);
    }

    /// The peak covers what this process touched: after writing 64 MiB it is at least that.
    #[test]
    fn peak_rss_is_plausible_and_grows_with_allocation() {
        let before = peak_rss_bytes().expect("peak RSS on this platform");
        assert!(before >= 1 << 20, "peak RSS {before} bytes is below 1 MiB");
        let block = vec![1u8; 64 << 20];
        let after = peak_rss_bytes().unwrap();
        assert!(std::hint::black_box(&block)
            .iter()
            .step_by(4096)
            .all(|&b| b == 1));
        assert!(after >= 64 << 20, "peak RSS {after} after touching 64 MiB");
        assert!(after >= before, "the peak never decreases");
        assert!(after < 1 << 40, "peak RSS {after} bytes is implausible");
    }

    /// `ru_maxrss` is the larger of the current image's peak and the peak of the image before
    /// the last `execve` (Linux keeps that across exec, so a test binary inherits a share of
    /// cargo's), which is why `VmHWM` comes first; it is never below `VmHWM`.
    #[cfg(target_os = "linux")]
    #[test]
    fn getrusage_is_at_least_vm_hwm() {
        let hwm = parse_vm_hwm(&std::fs::read_to_string("/proc/self/status").unwrap()).unwrap();
        let rusage = rusage_max_rss().expect("getrusage");
        assert!(rusage >= hwm, "getrusage {rusage} < VmHWM {hwm}");
    }
}
