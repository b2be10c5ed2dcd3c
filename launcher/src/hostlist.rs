//! SLURM node lists (`SLURM_JOB_NODELIST`, e.g. `gpu[01-04,07],login1`) to host names.
//!
//! The expansion itself is the `hostlist` crate's (it implements SLURM's syntax: ranges with
//! zero padding, several bracket groups per name, comma-separated names). That crate accepts
//! some malformed input without complaint (`linux[1` becomes `["linux"]`, `""` becomes `[""]`),
//! and a launcher that turns a typo into a one-host world hangs every other node: so
//! [`expand`] first checks the syntax strictly and refuses anything it cannot vouch for
//! (field case B22).
use anyhow::{bail, Result};

/// Expands a SLURM hostlist into host names, in SLURM's order.
///
/// Errors (naming the input) for: an empty list or empty name (`a,,b`), unbalanced or nested
/// brackets, an empty bracket or range element (`a[]`, `a[1,]`), a range element that is not
/// `N` or `N-M` with decimal digits and `N <= M`, and characters SLURM host names cannot hold
/// (whitespace, quotes).
pub fn expand(list: &str) -> Result<Vec<String>> {
    check_syntax(list).map_err(|why| anyhow::anyhow!("hostlist '{list}': {why}"))?;
    let hosts = hostlist::expand(list).map_err(|e| anyhow::anyhow!("hostlist '{list}': {e}"))?;
    if hosts.is_empty() || hosts.iter().any(|h| h.is_empty()) {
        bail!("hostlist '{list}': expands to an empty host name");
    }
    Ok(hosts)
}

fn check_syntax(list: &str) -> std::result::Result<(), String> {
    if list.trim().is_empty() {
        return Err("empty".into());
    }
    if let Some(c) = list
        .chars()
        .find(|c| c.is_whitespace() || matches!(c, '"' | '\'' | '\\'))
    {
        return Err(format!("unexpected character {c:?}"));
    }
    // Split on commas outside brackets into names; each name is text with bracket groups.
    let mut depth = 0usize;
    let mut name = String::new();
    let mut names = Vec::new();
    for c in list.chars() {
        match c {
            '[' => {
                if depth > 0 {
                    return Err("nested '['".into());
                }
                depth = 1;
                name.push(c);
            }
            ']' => {
                if depth == 0 {
                    return Err("']' without '['".into());
                }
                depth = 0;
                name.push(c);
            }
            ',' if depth == 0 => names.push(std::mem::take(&mut name)),
            _ => name.push(c),
        }
    }
    if depth > 0 {
        return Err("'[' without ']'".into());
    }
    names.push(name);
    for name in &names {
        if name.is_empty() {
            return Err(
                "empty host name (two commas in a row, or a leading/trailing comma)".into(),
            );
        }
        let mut rest = name.as_str();
        while let Some(open) = rest.find('[') {
            let close = open + rest[open..].find(']').expect("balanced above");
            check_ranges(&rest[open + 1..close])?;
            rest = &rest[close + 1..];
        }
    }
    Ok(())
}

fn check_ranges(inner: &str) -> std::result::Result<(), String> {
    if inner.is_empty() {
        return Err("empty '[]'".into());
    }
    for element in inner.split(',') {
        let (lo, hi) = element.split_once('-').unwrap_or((element, element));
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(lo) || !digits(hi) {
            return Err(format!("range element '{element}' is not N or N-M"));
        }
        let (a, b): (u64, u64) = match (lo.parse(), hi.parse()) {
            (Ok(a), Ok(b)) => (a, b),
            _ => return Err(format!("range element '{element}' is too large")),
        };
        if a > b {
            return Err(format!("range element '{element}' runs backwards"));
        }
        if b - a > 100_000 {
            return Err(format!(
                "range element '{element}' has more than 100000 hosts"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_ranges_and_lists() {
        assert_eq!(
            expand("gpu[01-04,07]").unwrap(),
            ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]
        );
        assert_eq!(expand("a,b[1-2]").unwrap(), ["a", "b1", "b2"]);
    }

    #[test]
    fn refuses_malformed_lists() {
        for bad in [
            "", "linux[1", "linux1]", "a,,b", "a[]", "a[1,]", "a[3-1]", "a[[1]]", "a[x]", " a",
        ] {
            assert!(expand(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
