//! Tar bytes -> WebDataset samples, over any [`std::io::Read`] (whole-shard buffers today,
//! streamed object reads later).
//!
//! Format (WebDataset spec, <https://github.com/webdataset/webdataset#the-webdataset-format>):
//! a POSIX tar whose CONSECUTIVE members sharing a key form one sample. A member's key is its
//! path with the basename cut at the first `.` (directory part kept: `a/b/0001.seg.png` ->
//! key `a/b/0001`, field `seg.png`); the rest of the basename is the field name (lower-cased
//! here, so `x.JPG` and `x.jpg` are the same field).
//!
//! The tar framing (512-byte ustar headers, GNU `L` long names, pax `x` path records) is parsed
//! here rather than with `tar::Archive`, because the failure policy needs byte offsets and needs
//! to tell "archive ends without its two zero blocks" from "archive cut mid-member":
//!
//! | input (field case) | result |
//! |---|---|
//! | cut mid-header or mid-member (B01) | samples completed before the cut, then [`ShardError::Truncated`] with the byte offset |
//! | EOF exactly on a header boundary, no zero blocks (B02) | tolerated: `tracing::warn!` "missing end-of-archive", [`SampleReader::missing_end_of_archive`] is set; the last group is yielded as is (the consumer reports missing fields) |
//! | a key that reappears after another key (B04) | [`ShardError::NonContiguous`] naming the key (no half-samples are regrouped) |
//! | the same field twice in one sample, e.g. after `tar -r` (B04) | [`ShardError::DuplicateField`]: "duplicate field jpg in sample 000000" |
//! | bad header checksum | [`ShardError::BadHeader`] with the offset |
//!
//! Every `ShardError` ends the shard: the iterator yields it once, then `None`. Samples already
//! yielded stay valid. Whether a sample has the fields a consumer needs (`cls`, an image) is the
//! consumer's decision ([`crate::data::reader`]).

use std::collections::{BTreeMap, HashSet};
use std::io::Read;

/// One sample: the consecutive tar members sharing `key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Sample key (member path up to the first `.` of its basename), e.g. `"n01443537_10"`.
    pub key: String,
    /// Field name (lower-cased extension, e.g. `"jpg"`, `"cls"`, `"json"`) -> member bytes.
    pub fields: BTreeMap<String, Vec<u8>>,
    /// Byte offset in the tar of the sample's first member header.
    pub offset: u64,
}

/// Why the rest of a shard cannot be read. Every variant ends the shard.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    /// The archive ends inside a header or a member's data (interrupted upload, B01).
    #[error("truncated at byte {offset} (inside {what})")]
    Truncated {
        /// Bytes present (where the data ends).
        offset: u64,
        /// What was being read when it ended.
        what: String,
    },
    /// A header whose checksum does not match (corruption, or not a tar at all).
    #[error("bad tar header at byte {offset}: {reason}")]
    BadHeader {
        /// Byte offset of the header.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// A key seen earlier reappears after a different key (members not adjacent, B04).
    #[error("sample key {key:?} reappears at byte {offset} after other samples (members of a sample must be adjacent)")]
    NonContiguous {
        /// The reappearing key.
        key: String,
        /// Byte offset of the member header where it reappears.
        offset: u64,
    },
    /// The same field twice within one sample (`tar -r` append, B04).
    #[error("duplicate field {field} in sample {key} (at byte {offset})")]
    DuplicateField {
        /// Field (extension), e.g. `jpg`.
        field: String,
        /// Sample key.
        key: String,
        /// Byte offset of the second member's header.
        offset: u64,
    },
    /// An I/O error of the underlying reader other than EOF.
    #[error("read error at byte {offset}: {message}")]
    Io {
        /// Bytes consumed before the error.
        offset: u64,
        /// The I/O error, as text.
        message: String,
    },
}

/// Iterator over the samples of one tar shard. See the module docs for the failure policy.
pub struct SampleReader<R: Read> {
    inner: R,
    /// Shard name, only for log messages.
    shard: String,
    /// Bytes consumed so far (= offset of the next header while between members).
    offset: u64,
    /// The sample being assembled: its members have been read, its end not yet seen.
    current: Option<Sample>,
    /// Keys of samples already yielded, to detect non-adjacent members.
    closed: HashSet<String>,
    /// An error found while the sample before it was being closed; returned on the next call.
    pending_error: Option<ShardError>,
    done: bool,
    missing_end: bool,
}

impl<R: Read> SampleReader<R> {
    /// Reads samples from `inner`; `shard` names the shard in warnings.
    pub fn new(inner: R, shard: &str) -> Self {
        SampleReader {
            inner,
            shard: shard.to_string(),
            offset: 0,
            current: None,
            closed: HashSet::new(),
            pending_error: None,
            done: false,
            missing_end: false,
        }
    }

    /// True once the archive ended on a header boundary without its end-of-archive zero blocks
    /// (a writer killed before `close`). Already warned about.
    pub fn missing_end_of_archive(&self) -> bool {
        self.missing_end
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Reads up to `buf.len()` bytes; returns how many (short only at EOF).
    fn read_full(&mut self, buf: &mut [u8]) -> Result<usize, ShardError> {
        let mut n = 0;
        while n < buf.len() {
            match self.inner.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(ShardError::Io {
                        offset: self.offset + n as u64,
                        message: e.to_string(),
                    })
                }
            }
        }
        self.offset += n as u64;
        Ok(n)
    }

    /// Reads one member's data (`size` bytes) plus its padding to the next 512-byte boundary.
    fn read_data(&mut self, size: u64, what: &str) -> Result<Vec<u8>, ShardError> {
        // Never trust `size` for the allocation: read in chunks so a corrupt header claiming
        // terabytes fails at EOF instead of aborting on allocation.
        let mut data = Vec::with_capacity(size.min(1 << 20) as usize);
        let mut left = size;
        let mut chunk = vec![0u8; 64 * 1024];
        while left > 0 {
            let want = left.min(chunk.len() as u64) as usize;
            let got = self.read_full(&mut chunk[..want])?;
            data.extend_from_slice(&chunk[..got]);
            if got < want {
                return Err(ShardError::Truncated {
                    offset: self.offset,
                    what: format!("data of {what}, {} of {size} bytes present", data.len()),
                });
            }
            left -= got as u64;
        }
        let pad = ((512 - size % 512) % 512) as usize;
        if pad > 0 {
            let mut p = [0u8; 512];
            let got = self.read_full(&mut p[..pad])?;
            if got < pad {
                // The data is complete; only the padding of the final member is missing.
                self.missing_end = true;
            }
        }
        Ok(data)
    }

    /// Next regular member's header as `(path, data size, header offset)`, skipping
    /// directories and metadata entries (whose data it consumes). The member's data is NOT read:
    /// the caller reads it with `read_data`. `Ok(None)` at the end of the archive.
    fn next_header(&mut self) -> Result<Option<(String, u64, u64)>, ShardError> {
        let mut long_name: Option<String> = None;
        loop {
            let header_at = self.offset;
            let mut block = [0u8; 512];
            let got = self.read_full(&mut block)?;
            if got == 0 {
                if !self.missing_end {
                    tracing::warn!(
                        shard = %self.shard,
                        offset = header_at,
                        "missing end-of-archive: tar ends on a header boundary without its zero blocks (writer killed before close?); using what is there"
                    );
                }
                self.missing_end = true;
                return Ok(None);
            }
            if got < 512 {
                return Err(ShardError::Truncated {
                    offset: self.offset,
                    what: format!("the header at byte {header_at}"),
                });
            }
            if block.iter().all(|&b| b == 0) {
                return Ok(None); // end-of-archive; the second zero block is not required
            }
            let header = tar::Header::from_byte_slice(&block);
            let stored = header.cksum().map_err(|e| ShardError::BadHeader {
                offset: header_at,
                reason: format!("unreadable checksum field: {e}"),
            })?;
            let computed: u32 = block
                .iter()
                .enumerate()
                .map(|(i, &b)| {
                    if (148..156).contains(&i) {
                        32
                    } else {
                        b as u32
                    }
                })
                .sum();
            if stored != computed {
                return Err(ShardError::BadHeader {
                    offset: header_at,
                    reason: format!("checksum {stored} != computed {computed}"),
                });
            }
            let size = header.entry_size().map_err(|e| ShardError::BadHeader {
                offset: header_at,
                reason: format!("unreadable size field: {e}"),
            })?;
            let raw_path = String::from_utf8_lossy(&header.path_bytes()).into_owned();
            use tar::EntryType;
            match header.entry_type() {
                EntryType::Regular | EntryType::Continuous => {
                    let path = long_name.take().unwrap_or(raw_path);
                    return Ok(Some((path, size, header_at)));
                }
                EntryType::GNULongName => {
                    let data = self.read_data(size, "a GNU long-name record")?;
                    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
                    long_name = Some(String::from_utf8_lossy(&data[..end]).into_owned());
                }
                EntryType::XHeader => {
                    let data = self.read_data(size, "a pax header")?;
                    if let Some(p) = pax_path(&data) {
                        long_name = Some(p);
                    }
                }
                // Directories, links, global pax headers, ...: not sample members.
                _ => {
                    self.read_data(size, &format!("member {raw_path:?}"))?;
                    long_name = None;
                }
            }
        }
    }

    fn step(&mut self) -> Result<Option<Sample>, ShardError> {
        if let Some(e) = self.pending_error.take() {
            return Err(e);
        }
        loop {
            let Some((path, size, at)) = self.next_header()? else {
                return Ok(self.current.take());
            };
            let (dir, base) = match path.rfind('/') {
                Some(i) => (&path[..=i], &path[i + 1..]),
                None => ("", path.as_str()),
            };
            let what = format!("member {path:?}");
            let dot = match base.find('.') {
                Some(dot) if dot > 0 => dot,
                _ => {
                    tracing::warn!(shard = %self.shard, member = %path, "tar member without a key or an extension ignored");
                    self.read_data(size, &what)?;
                    continue;
                }
            };
            let key = format!("{dir}{}", &base[..dot]);
            let field = base[dot + 1..].to_ascii_lowercase();
            if self.current.as_ref().is_some_and(|c| c.key != key) {
                // A new key starts: the current sample is complete before this member's data is
                // read, so a cut inside that data still yields it (B01).
                let done = self.current.take().expect("checked");
                if self.closed.contains(&key) {
                    // Interleaved members: `done` may be a fragment too; yield nothing more.
                    return Err(ShardError::NonContiguous { key, offset: at });
                }
                self.closed.insert(done.key.clone());
                match self.read_data(size, &what) {
                    Ok(data) => {
                        self.current = Some(Sample {
                            key,
                            fields: BTreeMap::from([(field, data)]),
                            offset: at,
                        });
                    }
                    Err(e) => self.pending_error = Some(e),
                }
                return Ok(Some(done));
            }
            let data = self.read_data(size, &what)?;
            match &mut self.current {
                Some(cur) if cur.key == key => {
                    if cur.fields.contains_key(&field) {
                        return Err(ShardError::DuplicateField {
                            field,
                            key,
                            offset: at,
                        });
                    }
                    cur.fields.insert(field, data);
                }
                Some(_) => unreachable!("a different key was handled above"),
                None => {
                    if self.closed.contains(&key) {
                        return Err(ShardError::NonContiguous { key, offset: at });
                    }
                    self.current = Some(Sample {
                        key,
                        fields: BTreeMap::from([(field, data)]),
                        offset: at,
                    });
                }
            }
        }
    }
}

impl<R: Read> Iterator for SampleReader<R> {
    type Item = Result<Sample, ShardError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.step() {
            Ok(Some(s)) => Some(Ok(s)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                self.current = None;
                Some(Err(e))
            }
        }
    }
}

/// The `path` record of a pax extended header (`"<len> path=<value>\n"` records).
fn pax_path(data: &[u8]) -> Option<String> {
    let mut rest = data;
    while !rest.is_empty() {
        let sp = rest.iter().position(|&b| b == b' ')?;
        let len: usize = std::str::from_utf8(&rest[..sp]).ok()?.parse().ok()?;
        if len <= sp || len > rest.len() {
            return None;
        }
        let record = &rest[sp + 1..len];
        let record = record.strip_suffix(b"\n").unwrap_or(record);
        if let Some(v) = record.strip_prefix(b"path=") {
            return Some(String::from_utf8_lossy(v).into_owned());
        }
        rest = &rest[len..];
    }
    None
}

/// Appends one member to a tar being built, with deterministic metadata (ustar, mode 0644,
/// mtime 0, uid/gid 0, no user/group names) so rebuilding gives identical bytes.
pub fn append_member<W: std::io::Write>(
    builder: &mut tar::Builder<W>,
    path: &str,
    data: &[u8],
) -> std::io::Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header.set_entry_type(tar::EntryType::Regular);
    builder.append_data(&mut header, path, data)
}

/// Test helper: a tar of `(path, data)` members written by [`append_member`].
#[cfg(test)]
pub(crate) fn tar_of(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (p, d) in members {
        append_member(&mut b, p, d).unwrap();
    }
    b.into_inner().unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(bytes: &[u8]) -> (Vec<Sample>, Option<ShardError>, bool) {
        let mut r = SampleReader::new(bytes, "test.tar");
        let mut out = Vec::new();
        let mut err = None;
        for s in &mut r {
            match s {
                Ok(s) => out.push(s),
                Err(e) => err = Some(e),
            }
        }
        (out, err, r.missing_end_of_archive())
    }

    #[test]
    fn groups_consecutive_members_by_key() {
        let t = tar_of(&[
            ("a.jpg", b"J1"),
            ("a.cls", b"3"),
            ("d/b.seg.PNG", b"P"),
            ("d/b.cls", b"4"),
            ("c.txt", b""),
        ]);
        let (s, err, missing) = collect(&t);
        assert!(err.is_none() && !missing);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].key, "a");
        assert_eq!(s[0].fields["jpg"], b"J1");
        assert_eq!(s[0].offset, 0);
        assert_eq!(s[1].key, "d/b");
        assert_eq!(s[1].fields.keys().collect::<Vec<_>>(), ["cls", "seg.png"]);
        assert_eq!(s[2].fields["txt"], b"");
    }

    #[test]
    fn long_names_survive() {
        let long = format!("{}/k.jpg", "d".repeat(150));
        let long2 = format!("{}/k.cls", "d".repeat(150));
        let t = tar_of(&[(&long, b"x"), (&long2, b"1")]);
        let (s, err, _) = collect(&t);
        assert!(err.is_none(), "{err:?}");
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].key, format!("{}/k", "d".repeat(150)));
    }

    #[test]
    fn truncation_anywhere_never_panics_and_keeps_earlier_samples() {
        let t = tar_of(&[
            ("a.jpg", &[7u8; 700]),
            ("a.cls", b"1"),
            ("b.jpg", &[8u8; 300]),
            ("b.cls", b"2"),
        ]);
        for cut in 0..t.len() {
            let (s, err, _) = collect(&t[..cut]);
            // A sample is yielded complete or not at all.
            for x in &s {
                match x.key.as_str() {
                    "a" => assert_eq!(x.fields["jpg"].len(), 700),
                    "b" => assert_eq!(x.fields["jpg"].len(), 300),
                    k => panic!("unexpected key {k}"),
                }
            }
            if let Some(ShardError::Truncated { offset, .. }) = err {
                assert_eq!(offset, cut as u64);
            }
        }
    }

    #[test]
    fn bad_checksum_is_an_error() {
        let mut t = tar_of(&[("a.jpg", b"x")]);
        t[0] ^= 1;
        let (_, err, _) = collect(&t);
        assert!(
            matches!(err, Some(ShardError::BadHeader { offset: 0, .. })),
            "{err:?}"
        );
    }
}
