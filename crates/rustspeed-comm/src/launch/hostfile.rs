//! DeepSpeed hostfiles: one `HOST slots=N` per line, `#` comments and blank lines ignored
//! (`runner._parse_hostfile`: the regex `^(\S+)\s+slots=(\d+)` on the stripped line; anything
//! after the digits is ignored, as there).

use std::path::Path;

use super::LaunchError;

/// Hosts and slot counts in file order. Errors, as DeepSpeed's ValueErrors: a duplicate host,
/// a line that does not match, no host at all.
pub fn parse_hostfile(text: &str, origin: &str) -> Result<Vec<(String, usize)>, LaunchError> {
    let mut pool: Vec<(String, usize)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || {
            LaunchError::Usage(format!(
                "{origin}:{}: bad hostfile entry '{line}': expected 'HOSTNAME slots=N' (e.g. 'worker-0 slots=4')",
                i + 1
            ))
        };
        let host_end = line.find(char::is_whitespace).ok_or_else(bad)?;
        let (host, rest) = line.split_at(host_end);
        let rest = rest.trim_start();
        let digits = rest.strip_prefix("slots=").ok_or_else(bad)?;
        let n_digits = digits.bytes().take_while(u8::is_ascii_digit).count();
        if n_digits == 0 {
            return Err(bad());
        }
        let slots: usize = digits[..n_digits].parse().map_err(|_| bad())?;
        if pool.iter().any(|(h, _)| h == host) {
            return Err(LaunchError::Usage(format!(
                "{origin}:{}: hostfile contains multiple entries for {host}; list each host once",
                i + 1
            )));
        }
        pool.push((host.to_string(), slots));
    }
    if pool.is_empty() {
        return Err(LaunchError::Usage(format!(
            "{origin}: hostfile is empty or not formatted correctly: expected lines like 'worker-0 slots=4'"
        )));
    }
    Ok(pool)
}

/// Reads a hostfile; `None` when it does not exist (DeepSpeed then runs on local resources).
pub fn fetch_hostfile(path: &Path) -> Result<Option<Vec<(String, usize)>>, LaunchError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| LaunchError::Usage(format!("cannot read hostfile {}: {e}", path.display())))?;
    parse_hostfile(&text, &path.display().to_string()).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    // REFERENCE §5 T6 / DeepSpeed test_hostfile_good and test_hostfiles_bad.
    #[test]
    fn good_hostfile_with_blank_lines_and_comments() {
        let text = "
    worker-1 slots=2
    worker-2 slots=2

    localhost slots=1
    123.23.12.10 slots=2

    #worker-1 slots=3
    # this is a comment

    ";
        let r = parse_hostfile(text, "hostfile").unwrap();
        assert_eq!(
            r,
            vec![
                ("worker-1".to_string(), 2),
                ("worker-2".to_string(), 2),
                ("localhost".to_string(), 1),
                ("123.23.12.10".to_string(), 2)
            ]
        );
    }

    #[test]
    fn bad_hostfiles() {
        let cases = [
            ("\n    worker-1 slots=2\n    worker-2 slots=1\n    worker-1 slots=1\n    ", "multiple entries for worker-1"),
            ("\n    this is bad slots=1\n    ", "bad hostfile entry 'this is bad slots=1'"),
            ("\n    missingslots\n    ", "bad hostfile entry 'missingslots'"),
            ("\n    ", "empty"),
            (
                "\n    worker-1 slots=2\n    this is bad slots=1\n    worker-2 slots=4\n    missingslots\n\n    ",
                "hostfile:3: bad hostfile entry",
            ),
            ("worker slots=x", "bad hostfile entry"),
        ];
        for (text, want) in cases {
            let e = parse_hostfile(text, "hostfile").unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        // As DeepSpeed's regex: trailing text after the count is ignored.
        assert_eq!(
            parse_hostfile("w slots=4 max_slots=8", "h").unwrap(),
            vec![("w".to_string(), 4)]
        );
    }
}
