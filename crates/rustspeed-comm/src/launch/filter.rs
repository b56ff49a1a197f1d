//! `--include` / `--exclude`: `NODE_SPEC[@NODE_SPEC...]`, `NODE_SPEC = NAME[:SLOT[,SLOT...]]`
//! (DeepSpeed `runner.parse_resource_filter` / `parse_inclusion_exclusion`).

use super::LaunchError;

/// Hosts and their slot ids, in hostfile order.
pub type Resources = Vec<(String, Vec<usize>)>;

/// `spec` -> host -> sorted, de-duplicated slots (empty = the whole host), in first-seen order.
fn parse_node_config_list(
    spec: &str,
    flag: &str,
) -> Result<Vec<(String, Vec<usize>)>, LaunchError> {
    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    for node in spec.split('@') {
        let (host, slots) = match node.split_once(':') {
            None => (node, Vec::new()),
            Some((host, list)) => {
                let slots = list
                    .split(',')
                    .map(|s| {
                        s.trim().parse::<usize>().map_err(|_| {
                            LaunchError::Usage(format!(
                                "{flag} '{spec}': bad slot '{s}' in '{node}': expected NAME[:SLOT[,SLOT...]] with integer slots, \
                                 several nodes joined by '@' (e.g. 'worker-0@worker-1:0,2')"
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                (host, slots)
            }
        };
        if host.is_empty() {
            return Err(LaunchError::Usage(format!(
                "{flag} '{spec}': empty host name in '{node}'; expected NAME[:SLOT[,SLOT...]][@...]"
            )));
        }
        match out.iter_mut().find(|(h, _)| h == host) {
            Some((_, s)) => s.extend(slots),
            None => out.push((host.to_string(), slots)),
        }
    }
    for (_, s) in out.iter_mut() {
        s.sort_unstable();
        s.dedup();
    }
    Ok(out)
}

/// Filters `hosts` (host -> available slots) by an include or an exclude spec (not both).
/// Unknown hosts and slots are errors; duplicate slots collapse; hosts left without slots
/// are dropped; the order of `hosts` is kept.
pub fn parse_resource_filter(
    hosts: &Resources,
    include: &str,
    exclude: &str,
) -> Result<Resources, LaunchError> {
    if !include.is_empty() && !exclude.is_empty() {
        return Err(LaunchError::Usage(
            "--include and --exclude are mutually exclusive: give one of them".into(),
        ));
    }
    if include.is_empty() && exclude.is_empty() {
        return Ok(hosts.clone());
    }
    let (spec, flag) = if include.is_empty() {
        (exclude, "--exclude")
    } else {
        (include, "--include")
    };
    let mut filtered: Resources = if include.is_empty() {
        hosts.clone()
    } else {
        Vec::new()
    };
    for (host, slots) in parse_node_config_list(spec, flag)? {
        let Some((_, avail)) = hosts.iter().find(|(h, _)| *h == host) else {
            let known: Vec<&str> = hosts.iter().map(|(h, _)| h.as_str()).collect();
            return Err(LaunchError::Usage(format!(
                "{flag} '{spec}': host '{host}' not found in the hostfile (hosts: {})",
                known.join(", ")
            )));
        };
        for s in &slots {
            if !avail.contains(s) {
                return Err(LaunchError::Usage(format!(
                    "{flag} '{spec}': no slot '{s}' on host '{host}' (its slots: {avail:?})"
                )));
            }
        }
        let chosen = if slots.is_empty() {
            avail.clone()
        } else {
            slots
        };
        if include.is_empty() {
            let entry = filtered.iter_mut().find(|(h, _)| *h == host).unwrap();
            entry.1.retain(|s| !chosen.contains(s));
        } else {
            match filtered.iter_mut().find(|(h, _)| *h == host) {
                Some(entry) => entry.1 = chosen,
                None => filtered.push((host, chosen)),
            }
        }
    }
    // Keep the hostfile's order (it decides which ranks go where), drop empty hosts.
    Ok(hosts
        .iter()
        .filter_map(|(h, _)| filtered.iter().find(|(f, _)| f == h))
        .filter(|(_, s)| !s.is_empty())
        .map(|(h, s)| {
            let mut seen = Vec::new();
            for x in s {
                if !seen.contains(x) {
                    seen.push(*x);
                }
            }
            (h.clone(), seen)
        })
        .collect())
}

/// A hostfile pool (host -> slot count) filtered by --include/--exclude.
pub fn parse_inclusion_exclusion(
    pool: &[(String, usize)],
    include: &str,
    exclude: &str,
) -> Result<Resources, LaunchError> {
    let hosts: Resources = pool
        .iter()
        .map(|(h, n)| (h.clone(), (0..*n).collect()))
        .collect();
    parse_resource_filter(&hosts, include, exclude)
}

#[cfg(test)]
mod tests {
    //! REFERENCE §5 T6: DeepSpeed's tests/unit/launcher/test_run.py, same inputs and results.
    use super::*;

    fn res(v: &[(&str, &[usize])]) -> Resources {
        v.iter().map(|(h, s)| (h.to_string(), s.to_vec())).collect()
    }

    fn usage_err(r: Result<Resources, LaunchError>) -> String {
        match r {
            Err(LaunchError::Usage(m)) => m,
            other => panic!("expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn mutual_exclusive() {
        let m = usage_err(parse_resource_filter(&Vec::new(), "A", "B"));
        assert!(m.contains("mutually exclusive"));
    }

    #[test]
    fn local() {
        let hosts = res(&[("worker-0", &[0, 1, 2, 3])]);
        let f = |i: &str, e: &str| parse_resource_filter(&hosts, i, e).unwrap();
        assert_eq!(f("", ""), hosts);
        assert_eq!(f("", "worker-0:1"), res(&[("worker-0", &[0, 2, 3])]));
        assert_eq!(f("", "worker-0:1,2"), res(&[("worker-0", &[0, 3])]));
        assert_eq!(f("worker-0:1", ""), res(&[("worker-0", &[1])]));
        assert_eq!(f("worker-0:1,1", ""), res(&[("worker-0", &[1])]));
        assert_eq!(
            f("worker-0:1@worker-0:0,1", ""),
            res(&[("worker-0", &[0, 1])])
        );
        assert_eq!(f("worker-0", ""), hosts);
        assert_eq!(f("", "worker-0"), res(&[]));
        assert_eq!(f("", "worker-0:0,1,2,3"), res(&[]));
    }

    #[test]
    fn multinode() {
        let hosts = res(&[("worker-0", &[0, 1, 2, 3]), ("worker-1", &[0, 1, 2, 3])]);
        let f = |i: &str, e: &str| parse_resource_filter(&hosts, i, e).unwrap();
        assert_eq!(f("", ""), hosts);
        assert_eq!(f("worker-1:0,3", ""), res(&[("worker-1", &[0, 3])]));
        assert_eq!(f("", "worker-1"), res(&[("worker-0", &[0, 1, 2, 3])]));
        assert_eq!(
            f("", "worker-0:0,1@worker-1:3"),
            res(&[("worker-0", &[2, 3]), ("worker-1", &[0, 1, 2])])
        );
        // Include keeps the hostfile's order, not the spec's.
        assert_eq!(
            f("worker-1:2@worker-0:3", ""),
            res(&[("worker-0", &[3]), ("worker-1", &[2])])
        );
    }

    #[test]
    fn errors() {
        let hosts = res(&[("worker-0", &[0, 1, 2, 3]), ("worker-1", &[0, 1, 2, 3])]);
        let e = |i: &str, x: &str| usage_err(parse_resource_filter(&hosts, i, x));
        assert!(e("jeff", "").contains("host 'jeff' not found"));
        assert!(e("", "jeff").contains("host 'jeff' not found"));
        assert!(e("worker-1:4", "").contains("no slot '4' on host 'worker-1'"));
        assert!(e("", "worker-1:4").contains("no slot '4' on host 'worker-1'"));
        // The malformed spec: '5' is read as a host name, as in DeepSpeed.
        assert!(e("", "worker-1@worker-0:1@5").contains("host '5' not found"));
        assert!(e("worker-0:a", "").contains("bad slot 'a'"));
        assert!(e("worker-0:1:2", "").contains("bad slot"));
        assert!(e("@worker-0", "").contains("empty host name"));
    }

    #[test]
    fn inclusion_exclusion_from_a_pool() {
        let pool = vec![("worker-0".to_string(), 4), ("worker-1".to_string(), 4)];
        let f = |i: &str, e: &str| parse_inclusion_exclusion(&pool, i, e).unwrap();
        assert_eq!(
            f("", ""),
            res(&[("worker-0", &[0, 1, 2, 3]), ("worker-1", &[0, 1, 2, 3])])
        );
        assert_eq!(f("worker-0", ""), res(&[("worker-0", &[0, 1, 2, 3])]));
        assert_eq!(
            f("worker-0@worker-1:0,2", ""),
            res(&[("worker-0", &[0, 1, 2, 3]), ("worker-1", &[0, 2])])
        );
        assert_eq!(f("worker-1:0,2", ""), res(&[("worker-1", &[0, 2])]));
        assert_eq!(
            f("", "worker-0:1"),
            res(&[("worker-0", &[0, 2, 3]), ("worker-1", &[0, 1, 2, 3])])
        );
        let pool = vec![("worker-0".to_string(), 4)];
        for spec in ["worker-0:4", "worker-0:99", "worker-0:0,4"] {
            usage_err(parse_inclusion_exclusion(&pool, spec, ""));
            usage_err(parse_inclusion_exclusion(&pool, "", spec));
        }
        usage_err(parse_inclusion_exclusion(&pool, "jeff", ""));
        let pool = vec![("localhost".to_string(), 2)];
        let m = usage_err(parse_inclusion_exclusion(&pool, "localhost:0,2", ""));
        assert!(m.contains("no slot '2' on host 'localhost'"), "{m}");
    }
}
