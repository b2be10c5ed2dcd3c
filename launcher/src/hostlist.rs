//! SLURM node lists (`SLURM_JOB_NODELIST`, e.g. `gpu[01-04,07],login1`) to host names.
//!
//! A strict parser of SLURM's hostlist syntax, written here because no maintained crate parses
//! it strictly: SLURM's own parser (`scontrol show hostnames`) and the crates that follow it
//! accept malformed input without complaint (`a,,b` becomes `a b`, `linux[1` becomes
//! `linux]`), and a launcher that turns a typo into a one-host world hangs every other node.
//! Every well-formed list expands exactly as `scontrol show hostnames` (SLURM 22.05) expands it.
//!
//! # Grammar
//!
//! ```text
//! list    = name ("," name)*                 commas outside brackets separate names
//! name    = (text | "[" ranges "]")+         e.g. rack[0-1]_blade[0-1].cluster
//! text    = one or more characters other than "[", "]", ",", whitespace, control
//!           characters, quotes and backslash
//! ranges  = element ("," element)*
//! element = N | N "-" M                      N, M: ASCII decimal digits, N <= M
//! ```
//!
//! # Expansion (as SLURM's)
//!
//! - A range element's numbers are zero-padded to the width of its low bound as written:
//!   `n[08-10]` is `n08 n09 n10`, `n[8-10]` is `n8 n9 n10`, `n[008-10]` is `n008 n009 n010`.
//! - Several bracket groups in one name form their Cartesian product, the first group
//!   outermost: `rack[0-1]_blade[0-1]` is `rack0_blade0 rack0_blade1 rack1_blade0 rack1_blade1`.
//! - Order is kept and duplicates are not removed (`h[1-3,2]` is `h1 h2 h3 h2`).
//!
//! At most [`MAX_HOSTS`] hosts: a longer expansion is refused before it is built.
use std::fmt;

/// The most hosts one list may expand to (larger than any SLURM cluster; keeps a typo such as
/// `n[0-99999]x[0-99999]` from allocating ten billion names).
pub const MAX_HOSTS: usize = 100_000;

/// Why a hostlist was refused. Its `Display` quotes the list (`hostlist "gpu[01": '[' without
/// ']'`); callers add the variable that held it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// The list as given.
    pub list: String,
    /// What is wrong with it.
    pub why: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "hostlist {:?}: {}", self.list, self.why)
    }
}

impl std::error::Error for Error {}

/// Expands a SLURM hostlist into host names, in SLURM's order (module docs).
///
/// Errors ([`Error`], quoting the list) for: an empty list or empty name (`a,,b`, `,a`, `a,`),
/// unbalanced or nested brackets, an empty bracket or range element (`a[]`, `a[1,]`), a range
/// element that is not `N` or `N-M` with ASCII decimal digits and `N <= M`, a number above
/// 10^18, a character a host name cannot hold (whitespace, control characters, quotes,
/// backslash), and an expansion of more than [`MAX_HOSTS`] hosts.
pub fn expand(list: &str) -> Result<Vec<String>, Error> {
    let fail = |why: String| Error {
        list: list.to_string(),
        why,
    };
    if list.is_empty() {
        return Err(fail("empty".into()));
    }
    let names = split_names(list).map_err(fail)?;
    let mut hosts = Vec::new();
    for name in names {
        let parts = parse_name(name).map_err(fail)?;
        expand_name(&parts, &mut hosts).map_err(fail)?;
    }
    Ok(hosts)
}

/// One piece of a name: literal text, or a bracket group's numbers (already padded).
enum Part<'a> {
    Text(&'a str),
    Group(Vec<Element>),
}

/// A range element: `lo..=hi`, each printed zero-padded to `width` digits.
struct Element {
    lo: u64,
    hi: u64,
    width: usize,
}

impl Element {
    fn len(&self) -> u64 {
        self.hi - self.lo + 1
    }
}

/// Splits on the commas outside brackets; checks characters and bracket nesting.
fn split_names(list: &str) -> Result<Vec<&str>, String> {
    let mut names = Vec::new();
    let mut open: Option<usize> = None; // byte offset of the unclosed '['
    let mut start = 0;
    for (i, c) in list.char_indices() {
        match c {
            '[' if open.is_some() => return Err("nested '['".into()),
            '[' => open = Some(i),
            ']' if open.is_none() => return Err("']' without '['".into()),
            ']' => open = None,
            ',' if open.is_none() => {
                names.push(&list[start..i]);
                start = i + 1; // ',' is one byte
            }
            c if c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | '\\') => {
                return Err(format!("unexpected character {c:?}"));
            }
            _ => {}
        }
    }
    if open.is_some() {
        return Err("'[' without ']'".into());
    }
    names.push(&list[start..]);
    if names.iter().any(|n| n.is_empty()) {
        return Err("empty host name (two commas in a row, or a leading or trailing comma)".into());
    }
    Ok(names)
}

/// Text and bracket groups of one name (brackets balanced and not nested: [`split_names`]).
fn parse_name(name: &str) -> Result<Vec<Part<'_>>, String> {
    let mut parts = Vec::new();
    let mut rest = name;
    while !rest.is_empty() {
        match rest.split_once('[') {
            None => {
                parts.push(Part::Text(rest));
                rest = "";
            }
            Some((text, after)) => {
                if !text.is_empty() {
                    parts.push(Part::Text(text));
                }
                let (inner, tail) = after
                    .split_once(']')
                    .ok_or_else(|| "'[' without ']'".to_string())?;
                parts.push(Part::Group(parse_group(inner)?));
                rest = tail;
            }
        }
    }
    Ok(parts)
}

/// The inside of one bracket group: `01-04,07`.
fn parse_group(inner: &str) -> Result<Vec<Element>, String> {
    if inner.is_empty() {
        return Err("empty '[]'".into());
    }
    inner
        .split(',')
        .map(|element| {
            let (lo, hi) = element.split_once('-').unwrap_or((element, element));
            let lo_n = number(lo, element)?;
            let hi_n = number(hi, element)?;
            if lo_n > hi_n {
                return Err(format!("range element '{element}' runs backwards"));
            }
            Ok(Element {
                lo: lo_n,
                hi: hi_n,
                width: lo.len(),
            })
        })
        .collect()
}

/// ASCII decimal digits, at most 10^18 (so sums and counts stay far from overflow).
fn number(digits: &str, element: &str) -> Result<u64, String> {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("range element '{element}' is not N or N-M"));
    }
    match digits.parse::<u64>() {
        Ok(n) if n <= 1_000_000_000_000_000_000 => Ok(n),
        _ => Err(format!("range element '{element}' is too large")),
    }
}

/// Appends the Cartesian product of `parts` (first group outermost) to `hosts`.
fn expand_name(parts: &[Part<'_>], hosts: &mut Vec<String>) -> Result<(), String> {
    // Count first: refuse an oversized expansion before building any of it.
    let mut count: u64 = 1;
    for part in parts {
        if let Part::Group(elements) = part {
            let n: u64 = elements.iter().map(Element::len).sum();
            count = count.saturating_mul(n);
        }
    }
    if count.saturating_add(hosts.len() as u64) > MAX_HOSTS as u64 {
        return Err(format!("expands to more than {MAX_HOSTS} hosts"));
    }
    let mut prefixes = vec![String::new()];
    for part in parts {
        prefixes = match part {
            Part::Text(text) => prefixes
                .into_iter()
                .map(|mut p| {
                    p.push_str(text);
                    p
                })
                .collect(),
            Part::Group(elements) => {
                let mut next = Vec::new();
                for prefix in &prefixes {
                    for e in elements {
                        for n in e.lo..=e.hi {
                            next.push(format!("{prefix}{n:0width$}", width = e.width));
                        }
                    }
                }
                next
            }
        };
    }
    hosts.extend(prefixes);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ok(list: &str) -> Vec<String> {
        expand(list).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn expands_ranges_and_lists_as_scontrol_does() {
        // Each expected value is what `scontrol show hostnames LIST` (SLURM 22.05) printed.
        assert_eq!(
            ok("gpu[01-04,07]"),
            ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]
        );
        assert_eq!(ok("a,b[1-2]"), ["a", "b1", "b2"]);
        assert_eq!(ok("a,a"), ["a", "a"]);
        assert_eq!(ok("h[1-3,2]"), ["h1", "h2", "h3", "h2"]);
        assert_eq!(ok("n[8-10]"), ["n8", "n9", "n10"]);
        assert_eq!(ok("n[008-10]"), ["n008", "n009", "n010"]);
        assert_eq!(ok("a[1-0003]"), ["a1", "a2", "a3"]);
        assert_eq!(ok("a[0001-3]"), ["a0001", "a0002", "a0003"]);
        assert_eq!(ok("a[1-2]b[3-4]"), ["a1b3", "a1b4", "a2b3", "a2b4"]);
        assert_eq!(ok("node[1-2]x[3]"), ["node1x3", "node2x3"]);
        assert_eq!(ok("x[1-2],y"), ["x1", "x2", "y"]);
        assert_eq!(ok("ü[1-2]"), ["ü1", "ü2"]);
        assert_eq!(ok("[1-2]"), ["1", "2"]);
        let hundred = ok("a[01-100]");
        assert_eq!(hundred.len(), 100);
        assert_eq!((hundred[0].as_str(), hundred[99].as_str()), ("a01", "a100"));
    }

    #[test]
    fn refuses_malformed_lists_naming_the_list_and_the_fault() {
        for (bad, why) in [
            ("", "empty"),
            ("linux[1", "'[' without ']'"),
            ("linux1]", "']' without '['"),
            ("a,,b", "empty host name"),
            (",a", "empty host name"),
            ("a,", "empty host name"),
            ("a[]", "empty '[]'"),
            ("a[1,]", "range element '' is not N or N-M"),
            ("a[3-1]", "runs backwards"),
            ("a[[1]]", "nested '['"),
            ("a[x]", "range element 'x' is not N or N-M"),
            ("a[1-2-3]", "range element '1-2-3' is not N or N-M"),
            ("a[-1]", "range element '-1' is not N or N-M"),
            ("a[1-]", "range element '1-' is not N or N-M"),
            ("a[1- 2]", "unexpected character ' '"),
            ("a[+1]", "range element '+1' is not N or N-M"),
            ("a[１]", "range element '１' is not N or N-M"),
            (" a", "unexpected character ' '"),
            ("a b", "unexpected character ' '"),
            ("a\tb", "unexpected character '\\t'"),
            ("a\"b", "unexpected character '\"'"),
            ("a\u{0}b", "unexpected character '\\0'"),
            ("a[999999999999999999999]", "too large"),
            ("a[0-99999]b[0-99999]", "more than 100000 hosts"),
            ("a[0-100000]", "more than 100000 hosts"),
        ] {
            let e = expand(bad).expect_err(bad);
            let text = e.to_string();
            assert!(
                text.contains(&format!("{bad:?}")) && text.contains(why),
                "{bad:?}: {text}"
            );
        }
        // The cap counts the whole list, not one name.
        assert!(expand("a[1-60000],b[1-60000]").is_err());
        assert_eq!(ok("a[1-50000],b[1-50000]").len(), MAX_HOSTS);
    }

    /// Field case B22: every case of the shared corpus expands to its expected hosts.
    #[test]
    fn b22_hostlists_expand_to_their_expected_hosts() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/field-cases/B22_hostlists.json"
        );
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
                panic!("{path}: {e} (CI=true: the shared field cases must be present)")
            }
            Err(e) => {
                println!("SKIP: {path}: {e}");
                return;
            }
        };
        let doc: serde_json::Value = serde_json::from_str(&text).expect("B22 is JSON");
        let cases = doc["cases"].as_object().expect("B22 has an object 'cases'");
        assert!(!cases.is_empty(), "B22 has no cases");
        for (list, hosts) in cases {
            let want: Vec<&str> = hosts
                .as_array()
                .expect("hosts is an array")
                .iter()
                .map(|h| h.as_str().expect("hosts are strings"))
                .collect();
            assert_eq!(ok(list), want, "{list:?}");
        }
    }

    /// A name pattern: text pieces and bracket groups, rendered the way SLURM compresses a
    /// host set (`prefix[01-03,07]suffix`), with the hosts it stands for.
    fn rendered_host_sets() -> impl Strategy<Value = (String, Vec<String>)> {
        let text = "[a-zA-Z0-9._-]{1,6}|[a-zü]{1,3}";
        // At most 3 names of 3 groups of 2 elements of 10 numbers: 24000 hosts, under the cap.
        let element = (0u64..2000, 0u64..10, 1usize..5).prop_map(|(lo, span, width)| {
            let lo_text = format!("{lo:0width$}");
            let hi = lo + span;
            let hosts: Vec<String> = (lo..=hi)
                .map(|n| format!("{n:0w$}", w = lo_text.len()))
                .collect();
            let rendered = if span == 0 {
                lo_text
            } else {
                format!("{lo_text}-{hi}")
            };
            (rendered, hosts)
        });
        let group = proptest::collection::vec(element, 1..3).prop_map(|elements| {
            let rendered = format!(
                "[{}]",
                elements
                    .iter()
                    .map(|(r, _)| r.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            );
            let numbers: Vec<String> = elements.into_iter().flat_map(|(_, h)| h).collect();
            (rendered, numbers)
        });
        let part = prop_oneof![text.prop_map(|t| (t.clone(), vec![t])), group,];
        let name = proptest::collection::vec(part, 1..4).prop_map(|parts| {
            let mut rendered = String::new();
            let mut hosts = vec![String::new()];
            for (r, pieces) in parts {
                rendered.push_str(&r);
                hosts = hosts
                    .iter()
                    .flat_map(|h| pieces.iter().map(move |p| format!("{h}{p}")))
                    .collect();
            }
            (rendered, hosts)
        });
        proptest::collection::vec(name, 1..4).prop_map(|names| {
            let rendered = names
                .iter()
                .map(|(r, _)| r.as_str())
                .collect::<Vec<_>>()
                .join(",");
            let hosts = names.into_iter().flat_map(|(_, h)| h).collect();
            (rendered, hosts)
        })
    }

    proptest! {
        /// Arbitrary Unicode never panics; a refusal quotes the input.
        #[test]
        fn never_panics_on_arbitrary_text(list in "\\PC{0,40}|[\\[\\]0-9,a-c-]{0,20}") {
            match expand(&list) {
                Ok(hosts) => prop_assert!(!hosts.is_empty() && hosts.iter().all(|h| !h.is_empty())),
                Err(e) => prop_assert!(e.to_string().contains(&format!("{list:?}")), "{}", e),
            }
        }

        /// A host set rendered as a compressed list expands back to exactly that set, in order.
        #[test]
        fn rendered_host_sets_expand_back((list, hosts) in rendered_host_sets()) {
            let got = expand(&list);
            prop_assert!(
                got.as_ref().ok() == Some(&hosts),
                "{:?}: {} hosts expected, got {:?}",
                list,
                hosts.len(),
                got.map(|h| h.len())
            );
        }
    }
}
