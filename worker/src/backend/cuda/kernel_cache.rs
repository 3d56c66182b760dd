//! The on-disk cache of compiled kernels: one file per kernel file, precision and target,
//! named `<stem>-<precision>-<arch>-<key>.bin`, where the key hashes everything the image
//! depends on (NVRTC's version, the source, the options). A restarted worker (a crash loop, a
//! rollout on the same node, a scale-up from zero with a persistent cache) then skips NVRTC.
//!
//! Entries are framed (magic, length, checksum) and written to a temporary file that is
//! renamed into place, so a worker killed mid-write or two workers sharing the folder never
//! leave a torn entry that reads as valid; a damaged entry reads as [`CacheLookup::Damaged`]
//! and is compiled again. Storing an entry removes the other keys of the same prefix, which
//! keeps one generation per file, precision and target; opening the cache removes the
//! temporary files of writes that died an hour or more ago. The folder's contents are executed
//! on the GPU, so it must be writable by the worker alone.
//!
//! Plain file IO with no CUDA in it, tested without a GPU.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The first bytes of every entry; a new framing gets a new magic.
const MAGIC: &[u8; 16] = b"ATOMIC-KERNEL-1\n";
/// Magic, body length and body checksum.
const HEADER_BYTES: usize = MAGIC.len() + 16;

/// A folder of compiled kernels.
#[derive(Debug)]
pub(crate) struct KernelCache {
    dir: PathBuf,
}

/// What [`KernelCache::get`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum CacheLookup {
    Hit(Vec<u8>),
    Miss,
    /// An entry exists but is not one this cache wrote whole; the reason says how.
    Damaged(String),
}

/// 64-bit FNV-1a over `parts`, each preceded by its length so that moving bytes from one part
/// to the next changes the key. Not a defence against tampering (the folder must be private);
/// stable across Rust releases, unlike the standard library's hasher.
pub(crate) fn key(parts: &[&[u8]]) -> u64 {
    let mut hash = Fnv1a::new();
    for part in parts {
        hash.write(&(part.len() as u64).to_le_bytes());
        hash.write(part);
    }
    hash.finish()
}

struct Fnv1a(u64);

impl Fnv1a {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

fn checksum(body: &[u8]) -> u64 {
    let mut hash = Fnv1a::new();
    hash.write(body);
    hash.finish()
}

/// The part of an entry's name before its key: `<stem>-<variant>-`. Only characters that are
/// safe in a file name on every system survive.
pub(crate) fn entry_prefix(stem: &str, variant: &str) -> String {
    let safe = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!("{}-{}-", safe(stem), safe(variant))
}

/// How old an unfinished write's temporary file must be before a start removes it: writes take
/// milliseconds, so an hour-old one belongs to a worker that died.
const STALE_TEMP_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Makes temporary names unique between the threads of one process (the process id separates
/// processes).
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl KernelCache {
    /// Opens `dir` as a cache, creating it if needed, and removes the temporary files of
    /// writes that never finished (a worker killed mid-write) once they are
    /// [`STALE_TEMP_AGE`] old; younger ones may be another worker's write in progress.
    pub(crate) fn open(dir: impl Into<PathBuf>) -> io::Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        let cache = Self { dir };
        cache.remove_stale_temps(std::time::SystemTime::now());
        Ok(cache)
    }

    /// Best effort, as the pruning of old keys.
    fn remove_stale_temps(&self, now: std::time::SystemTime) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if !(name.starts_with('.') && name.ends_with(".tmp")) {
                continue;
            }
            let modified = entry.metadata().and_then(|m| m.modified());
            let age = modified.ok().and_then(|m| now.duration_since(m).ok());
            if age.is_some_and(|age| age >= STALE_TEMP_AGE) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, prefix: &str, key: u64) -> PathBuf {
        self.dir.join(format!("{prefix}{key:016x}.bin"))
    }

    /// The entry for `prefix` and `key`, checked against its frame.
    pub(crate) fn get(&self, prefix: &str, key: u64) -> CacheLookup {
        let path = self.path(prefix, key);
        let data = match std::fs::read(&path) {
            Ok(data) => data,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return CacheLookup::Miss,
            Err(e) => return CacheLookup::Damaged(format!("{}: {e}", path.display())),
        };
        match unframe(&data) {
            Ok(body) => CacheLookup::Hit(body.to_vec()),
            Err(why) => CacheLookup::Damaged(format!("{}: {why}", path.display())),
        }
    }

    /// Stores `body` as the entry for `prefix` and `key`, then removes the prefix's other keys.
    pub(crate) fn put(&self, prefix: &str, key: u64, body: &[u8]) -> io::Result<()> {
        let path = self.path(prefix, key);
        let temp = self.dir.join(format!(
            ".{prefix}{key:016x}.{}.{}.tmp",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let written = (|| {
            let mut f = std::fs::File::create(&temp)?;
            f.write_all(&frame(body))?;
            // On disk before the rename makes it visible: a crash leaves the old state or the
            // new one, never a name pointing at half a file.
            f.sync_all()?;
            std::fs::rename(&temp, &path)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        written?;
        self.remove_other_keys(prefix, &path);
        Ok(())
    }

    /// Best effort: an entry that cannot be removed is only wasted space.
    fn remove_other_keys(&self, prefix: &str, keep: &Path) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if path != keep && name.starts_with(prefix) && name.ends_with(".bin") {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&checksum(body).to_le_bytes());
    out.extend_from_slice(body);
    out
}

fn unframe(data: &[u8]) -> Result<&[u8], String> {
    if data.len() < HEADER_BYTES {
        return Err(format!("{} bytes, shorter than the entry header", data.len()));
    }
    let (magic, rest) = data.split_at(MAGIC.len());
    if magic != MAGIC {
        return Err("not a kernel cache entry of this version (wrong magic)".into());
    }
    let (len, rest) = rest.split_at(8);
    let (sum, body) = rest.split_at(8);
    let len = u64::from_le_bytes(len.try_into().map_err(|_| "header")?);
    let sum = u64::from_le_bytes(sum.try_into().map_err(|_| "header")?);
    if body.len() as u64 != len {
        return Err(format!(
            "the header says {len} bytes, the entry holds {}",
            body.len()
        ));
    }
    if checksum(body) != sum {
        return Err("checksum mismatch".into());
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_cache(test: &str) -> KernelCache {
        let dir = std::env::temp_dir().join(format!("atomic-kernel-cache-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        KernelCache::open(&dir).expect("temp cache")
    }

    fn files_in(cache: &KernelCache) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(cache.dir())
            .expect("cache dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn an_entry_reads_back_as_written_and_other_keys_miss() {
        let cache = temp_cache("roundtrip");
        let prefix = entry_prefix("attention", "bf16-sm_90");
        assert_eq!(cache.get(&prefix, 1), CacheLookup::Miss);
        let body: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        cache.put(&prefix, 1, &body).expect("put");
        assert_eq!(cache.get(&prefix, 1), CacheLookup::Hit(body.clone()));
        assert_eq!(cache.get(&prefix, 2), CacheLookup::Miss);
        assert_eq!(
            cache.get(&entry_prefix("attention", "fp16-sm_90"), 1),
            CacheLookup::Miss
        );
        // An empty body is a valid entry too.
        cache.put(&prefix, 3, &[]).expect("put empty");
        assert_eq!(cache.get(&prefix, 3), CacheLookup::Hit(Vec::new()));
        // No temporary file is left behind.
        assert!(
            files_in(&cache).iter().all(|n| !n.ends_with(".tmp")),
            "{:?}",
            files_in(&cache)
        );
        let _ = std::fs::remove_dir_all(cache.dir());
    }

    #[test]
    fn storing_a_key_removes_the_other_keys_of_its_prefix_only() {
        let cache = temp_cache("prune");
        let norm = entry_prefix("norm", "fp32-sm_80");
        let gemv = entry_prefix("gemv", "fp32-sm_80");
        cache.put(&norm, 10, b"old").expect("put");
        cache.put(&gemv, 10, b"other file").expect("put");
        cache.put(&norm, 11, b"new").expect("put");
        assert_eq!(cache.get(&norm, 10), CacheLookup::Miss);
        assert_eq!(cache.get(&norm, 11), CacheLookup::Hit(b"new".to_vec()));
        assert_eq!(cache.get(&gemv, 10), CacheLookup::Hit(b"other file".to_vec()));
        assert_eq!(files_in(&cache).len(), 2, "{:?}", files_in(&cache));
        let _ = std::fs::remove_dir_all(cache.dir());
    }

    #[test]
    fn damaged_entries_are_reported_not_returned() {
        let cache = temp_cache("damaged");
        let prefix = entry_prefix("rope", "fp16-sm_90");
        let body = b"an image of some length".to_vec();
        let path = cache.path(&prefix, 5);
        let framed = frame(&body);
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "truncated in the header",
                framed[..10].to_vec(),
                "shorter than the entry header",
            ),
            (
                "truncated in the body",
                framed[..framed.len() - 3].to_vec(),
                "the header says",
            ),
            (
                "a byte flipped in the body",
                {
                    let mut d = framed.clone();
                    let last = d.len() - 1;
                    d[last] ^= 0x40;
                    d
                },
                "checksum mismatch",
            ),
            (
                "another format",
                {
                    let mut d = framed.clone();
                    d[0] = b'X';
                    d
                },
                "wrong magic",
            ),
            (
                "trailing bytes",
                [framed.as_slice(), b"xx"].concat(),
                "the header says",
            ),
        ];
        for (case, data, expected) in cases {
            std::fs::write(&path, &data).expect("write");
            match cache.get(&prefix, 5) {
                CacheLookup::Damaged(why) => assert!(why.contains(expected), "{case}: {why}"),
                other => panic!("{case}: {other:?}"),
            }
        }
        // Storing again repairs it.
        cache.put(&prefix, 5, &body).expect("put");
        assert_eq!(cache.get(&prefix, 5), CacheLookup::Hit(body));
        let _ = std::fs::remove_dir_all(cache.dir());
    }

    #[test]
    fn concurrent_writers_of_one_entry_leave_a_whole_one() {
        let cache = temp_cache("concurrent");
        let prefix = entry_prefix("softmax", "bf16-sm_90");
        let body: Vec<u8> = (0..200_000u32).map(|i| (i % 256) as u8).collect();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..5 {
                        cache.put(&prefix, 9, &body).expect("put");
                        match cache.get(&prefix, 9) {
                            CacheLookup::Hit(read) => assert_eq!(read, body),
                            // A reader never sees a torn entry, only a missing one at worst
                            // (another writer's prune runs for other keys only).
                            other => panic!("{other:?}"),
                        }
                    }
                });
            }
        });
        assert_eq!(files_in(&cache).len(), 1, "{:?}", files_in(&cache));
        let _ = std::fs::remove_dir_all(cache.dir());
    }

    #[test]
    fn the_key_changes_with_every_input_and_with_where_bytes_fall() {
        let base = key(&[b"nvrtc 13.0", b"source", b"--opt"]);
        assert_eq!(base, key(&[b"nvrtc 13.0", b"source", b"--opt"]));
        assert_ne!(base, key(&[b"nvrtc 13.1", b"source", b"--opt"]));
        assert_ne!(base, key(&[b"nvrtc 13.0", b"sourcE", b"--opt"]));
        assert_ne!(base, key(&[b"nvrtc 13.0", b"source", b"--opt", b"-DATOMIC_F16"]));
        assert_ne!(key(&[b"ab", b"c"]), key(&[b"a", b"bc"]));
        // The published FNV-1a 64 test vector, so the hash cannot drift between builds.
        let mut h = Fnv1a::new();
        h.write(b"a");
        assert_eq!(h.finish(), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn entry_names_keep_only_safe_characters() {
        assert_eq!(entry_prefix("gemv", "bf16-sm_90"), "gemv-bf16_sm_90-");
        assert_eq!(entry_prefix("../x", "a/b"), "___x-a_b-");
    }

    #[test]
    fn opening_removes_only_stale_temporary_files() {
        let cache = temp_cache("stale");
        let prefix = entry_prefix("norm", "fp32-sm_90");
        cache.put(&prefix, 1, b"kept").expect("put");
        let old = cache.dir().join(format!(".{prefix}0000000000000001.7.0.tmp"));
        let fresh = cache.dir().join(format!(".{prefix}0000000000000001.8.0.tmp"));
        for path in [&old, &fresh] {
            std::fs::write(path, b"half an entry").expect("write");
        }
        let two_hours_ago = std::time::SystemTime::now() - 2 * STALE_TEMP_AGE;
        std::fs::File::options()
            .write(true)
            .open(&old)
            .and_then(|f| f.set_modified(two_hours_ago))
            .expect("age the file");
        let reopened = KernelCache::open(cache.dir()).expect("reopen");
        assert!(!old.exists(), "an hour-old unfinished write is removed");
        assert!(fresh.exists(), "a write that may be in progress stays");
        assert_eq!(reopened.get(&prefix, 1), CacheLookup::Hit(b"kept".to_vec()));
        let _ = std::fs::remove_dir_all(cache.dir());
    }

    #[test]
    fn a_cache_folder_that_cannot_be_created_is_an_error() {
        let file = std::env::temp_dir().join(format!("atomic-kernel-cache-file-{}", std::process::id()));
        std::fs::write(&file, b"a file, not a folder").expect("write");
        assert!(KernelCache::open(file.join("sub")).is_err());
        let _ = std::fs::remove_file(&file);
    }
}
