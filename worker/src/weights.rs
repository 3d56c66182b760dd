//! Model weights: memory-maps `model.safetensors` (or the shards listed by
//! `model.safetensors.index.json`) and hands out tensors by name, converted to `f32` on request
//! or as raw bytes for backends that keep the stored precision.
//!
//! Files are mapped rather than read so that a 1 GB checkpoint costs page cache, not heap, and so
//! that a backend uploading bytes to a GPU never copies them twice. Headers are validated once at
//! open time (by the safetensors crate: offsets contiguous, sizes matching shape and dtype, data
//! ending exactly at the end of the file), and every slice taken later is bounds-checked again,
//! so a corrupt or truncated file yields an [`Error`], never a panic.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
pub use safetensors::Dtype;
use safetensors::tensor::{Metadata, SafeTensors};

use crate::{Error, Result};

/// The tensors of a model, memory-mapped from one safetensors file or several shards.
pub struct Weights {
    /// The file given to [`Weights::open`] (the safetensors file or the shard index).
    source: PathBuf,
    shards: Vec<Shard>,
    /// Tensor name to index into `shards`.
    index: HashMap<String, usize>,
}

/// One mapped safetensors file.
struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Offset of the data section (8-byte length + header) within the file.
    data_start: usize,
    metadata: Metadata,
}

/// A tensor as stored: element type, shape and little-endian bytes borrowed from the mapping.
#[derive(Debug, Clone, Copy)]
pub struct RawTensor<'a> {
    /// Element type.
    pub dtype: Dtype,
    /// Shape, outermost dimension first (row-major).
    pub shape: &'a [usize],
    /// The elements' bytes, little-endian, row-major.
    pub data: &'a [u8],
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field("source", &self.source)
            .field("shards", &self.shards.len())
            .field("tensors", &self.index.len())
            .finish()
    }
}

impl Weights {
    /// Opens a `.safetensors` file, or a `*.safetensors.index.json` shard index (whose shard
    /// files must sit in the same folder).
    pub fn open(path: &Path) -> Result<Self> {
        let is_index = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(".index.json"));
        if is_index {
            return Self::open_index(path);
        }
        let shard = Shard::open(path)?;
        let index = shard
            .metadata
            .tensors()
            .into_keys()
            .map(|name| (name, 0))
            .collect();
        Ok(Self {
            source: path.to_path_buf(),
            shards: vec![shard],
            index,
        })
    }

    fn open_index(path: &Path) -> Result<Self> {
        let error = |message: String| Error::Weights {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let index: ShardIndex =
            serde_json::from_str(&text).map_err(|e| error(format!("not a safetensors shard index: {e}")))?;
        let folder = path.parent().unwrap_or(Path::new("."));

        let mut shards: Vec<Shard> = Vec::new();
        let mut shard_of_file: HashMap<&str, usize> = HashMap::new();
        let mut names = HashMap::new();
        // Sorted so that shards open in a stable order and errors are reproducible.
        let mut entries: Vec<(&String, &String)> = index.weight_map.iter().collect();
        entries.sort();
        for (name, file) in entries {
            // Shard names are plain file names; anything else could reach outside the folder.
            if file.is_empty() || file.contains(['/', '\\']) || file == ".." || file == "." {
                return Err(error(format!(
                    "tensor `{name}` points to `{file}`, which is not a file name in this folder"
                )));
            }
            let shard_index = match shard_of_file.get(file.as_str()) {
                Some(&i) => i,
                None => {
                    shards.push(Shard::open(&folder.join(file))?);
                    shard_of_file.insert(file, shards.len() - 1);
                    shards.len() - 1
                }
            };
            let shard = &shards[shard_index];
            if shard.metadata.info(name).is_none() {
                return Err(Error::MissingTensor {
                    path: shard.path.clone(),
                    name: name.clone(),
                });
            }
            names.insert(name.clone(), shard_index);
        }
        Ok(Self {
            source: path.to_path_buf(),
            shards,
            index: names,
        })
    }

    /// The file this was opened from (the safetensors file or the shard index).
    pub fn path(&self) -> &Path {
        &self.source
    }

    /// Whether a tensor of that name exists.
    pub fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.index.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// The stored shape of a tensor, if it exists.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        let shard = &self.shards[*self.index.get(name)?];
        shard.metadata.info(name).map(|info| info.shape.as_slice())
    }

    /// The stored element type of a tensor, if it exists.
    pub fn dtype(&self, name: &str) -> Option<Dtype> {
        let shard = &self.shards[*self.index.get(name)?];
        shard.metadata.info(name).map(|info| info.dtype)
    }

    /// The tensor as stored, borrowed from the memory map.
    pub fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        let missing = || Error::MissingTensor {
            path: self.source.clone(),
            name: name.to_string(),
        };
        let shard = self
            .index
            .get(name)
            .map(|&i| &self.shards[i])
            .ok_or_else(missing)?;
        let info = shard.metadata.info(name).ok_or_else(missing)?;
        let (begin, end) = info.data_offsets;
        // The header was validated at open time; checking again costs nothing and keeps a
        // slicing panic impossible even if that validation ever changes.
        let data = shard
            .data_start
            .checked_add(begin)
            .zip(shard.data_start.checked_add(end))
            .and_then(|(b, e)| shard.mmap.get(b..e))
            .ok_or_else(|| Error::Weights {
                path: shard.path.clone(),
                message: format!("tensor `{name}` has data offsets {begin}..{end} outside the file"),
            })?;
        Ok(RawTensor {
            dtype: info.dtype,
            shape: &info.shape,
            data,
        })
    }

    /// The tensor converted to `f32` (from f32, f16 or bf16), after checking that its shape is
    /// `expected_shape`. Row-major, as stored.
    pub fn get(&self, name: &str, expected_shape: &[usize]) -> Result<Vec<f32>> {
        let tensor = self.raw(name)?;
        let path = || self.shard_path(name);
        if tensor.shape != expected_shape {
            return Err(Error::TensorShape {
                path: path(),
                name: name.to_string(),
                expected: expected_shape.to_vec(),
                found: tensor.shape.to_vec(),
            });
        }
        let element_size = match tensor.dtype {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            other => {
                return Err(Error::TensorDtype {
                    path: path(),
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        let count = tensor.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        if count.and_then(|n| n.checked_mul(element_size)) != Some(tensor.data.len()) {
            return Err(Error::Weights {
                path: path(),
                message: format!(
                    "tensor `{name}` holds {} bytes, which does not match shape {:?} of {:?}",
                    tensor.data.len(),
                    tensor.shape,
                    tensor.dtype
                ),
            });
        }
        // Byte-wise decoding: the mapping gives no alignment guarantee for the element type.
        let values = match tensor.dtype {
            Dtype::F32 => tensor
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => tensor
                .data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            _ => tensor
                .data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        };
        Ok(values)
    }

    /// The file holding `name` (the shard, for sharded weights), for error messages.
    fn shard_path(&self, name: &str) -> PathBuf {
        match self.index.get(name) {
            Some(&i) => self.shards[i].path.clone(),
            None => self.source.clone(),
        }
    }
}

impl Shard {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the mapping is read-only and private to this process. Mutation of the file by
        // another process while mapped would be undefined behaviour; model folders are
        // immutable once deployed, which is the same assumption every safetensors loader makes.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| Error::Weights {
            path: path.to_path_buf(),
            message: format!("not a valid safetensors file: {e}"),
        })?;
        let data_start = header_len.checked_add(8).ok_or_else(|| Error::Weights {
            path: path.to_path_buf(),
            message: "header length overflows".to_string(),
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            data_start,
            metadata,
        })
    }
}

/// The part of `model.safetensors.index.json` that matters: tensor name to shard file name.
#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use safetensors::tensor::TensorView;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn temp_dir(name: &str) -> PathBuf {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("atomic-worker-weights-{}-{name}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    const VALUES: [f32; 6] = [1.0, -2.5, 0.125, 3.0, -0.0, 1024.0];

    /// A safetensors file holding the same six values as f32 [2,3], f16 [3,2], bf16 [6], plus
    /// an i64 tensor.
    fn sample_bytes() -> Vec<u8> {
        let f32s: Vec<u8> = VALUES.iter().flat_map(|v| v.to_le_bytes()).collect();
        let f16s: Vec<u8> = VALUES
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let bf16s: Vec<u8> = VALUES
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        let ints: Vec<u8> = [7i64, 8].iter().flat_map(|v| v.to_le_bytes()).collect();
        let tensors = vec![
            ("a.f32", TensorView::new(Dtype::F32, vec![2, 3], &f32s).unwrap()),
            ("b.f16", TensorView::new(Dtype::F16, vec![3, 2], &f16s).unwrap()),
            ("c.bf16", TensorView::new(Dtype::BF16, vec![6], &bf16s).unwrap()),
            ("d.i64", TensorView::new(Dtype::I64, vec![2], &ints).unwrap()),
        ];
        safetensors::serialize(tensors, None).unwrap()
    }

    fn sample_file(name: &str) -> PathBuf {
        let path = temp_dir(name).join("model.safetensors");
        std::fs::write(&path, sample_bytes()).unwrap();
        path
    }

    #[test]
    fn reads_f32_f16_bf16() {
        let path = sample_file("read");
        let w = Weights::open(&path).unwrap();
        assert_eq!(w.get("a.f32", &[2, 3]).unwrap(), VALUES);
        assert_eq!(w.get("b.f16", &[3, 2]).unwrap(), VALUES);
        assert_eq!(w.get("c.bf16", &[6]).unwrap(), VALUES);
        assert!(w.has("a.f32"));
        assert!(!w.has("nope"));
        assert_eq!(w.names(), vec!["a.f32", "b.f16", "c.bf16", "d.i64"]);
        assert_eq!(w.shape("b.f16"), Some(&[3, 2][..]));
        assert_eq!(w.dtype("c.bf16"), Some(Dtype::BF16));
        let raw = w.raw("d.i64").unwrap();
        assert_eq!(raw.data.len(), 16);
        assert_eq!(w.path(), path);
    }

    #[test]
    fn missing_tensor_names_tensor_and_file() {
        let path = sample_file("missing");
        let w = Weights::open(&path).unwrap();
        let err = w.get("encoder.layer.0.x", &[1]).unwrap_err();
        assert!(matches!(&err, Error::MissingTensor { name, .. } if name == "encoder.layer.0.x"));
        let text = err.to_string();
        assert!(text.contains("encoder.layer.0.x"), "{text}");
        assert!(text.contains(&path.display().to_string()), "{text}");
    }

    #[test]
    fn shape_mismatch_names_tensor_and_file() {
        let path = sample_file("shape");
        let w = Weights::open(&path).unwrap();
        let err = w.get("a.f32", &[3, 2]).unwrap_err();
        assert!(matches!(
            &err,
            Error::TensorShape { name, expected, found, .. }
                if name == "a.f32" && expected == &[3, 2] && found == &[2, 3]
        ));
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(
            text.contains("`a.f32` has shape [2, 3], expected [3, 2]"),
            "{text}"
        );
    }

    #[test]
    fn unsupported_dtype_is_named() {
        let path = sample_file("dtype");
        let w = Weights::open(&path).unwrap();
        let err = w.get("d.i64", &[2]).unwrap_err();
        assert!(matches!(&err, Error::TensorDtype { dtype, .. } if dtype == "I64"));
        assert!(err.to_string().contains("d.i64"), "{err}");
    }

    #[test]
    fn missing_and_empty_and_garbage_files() {
        let dir = temp_dir("bad");
        let err = Weights::open(&dir.join("model.safetensors")).unwrap_err();
        assert!(matches!(err, Error::MissingFile { .. }), "{err:?}");

        let empty = dir.join("empty.safetensors");
        std::fs::write(&empty, b"").unwrap();
        let err = Weights::open(&empty).unwrap_err();
        assert!(matches!(err, Error::Weights { .. }), "{err:?}");
        assert!(err.to_string().contains("empty.safetensors"), "{err}");

        let garbage = dir.join("garbage.safetensors");
        std::fs::write(&garbage, b"\xff\xff\xff\xff\xff\xff\xff\x7fhello").unwrap();
        assert!(matches!(Weights::open(&garbage), Err(Error::Weights { .. })));

        let truncated = dir.join("truncated.safetensors");
        let bytes = sample_bytes();
        std::fs::write(&truncated, &bytes[..bytes.len() - 1]).unwrap();
        let err = Weights::open(&truncated).unwrap_err();
        assert!(err.to_string().contains("truncated.safetensors"), "{err}");
    }

    #[test]
    fn sharded_index() {
        let dir = temp_dir("shards");
        let one: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let two: Vec<u8> = [3.0f32].iter().flat_map(|v| v.to_le_bytes()).collect();
        let write = |file: &str, name: &str, data: &[u8], shape: Vec<usize>| {
            let view = TensorView::new(Dtype::F32, shape, data).unwrap();
            let bytes = safetensors::serialize(vec![(name, view)], None).unwrap();
            std::fs::write(dir.join(file), bytes).unwrap();
        };
        write("model-00001-of-00002.safetensors", "x", &one, vec![2]);
        write("model-00002-of-00002.safetensors", "y", &two, vec![1]);
        let index = dir.join("model.safetensors.index.json");
        std::fs::write(
            &index,
            r#"{"metadata": {"total_size": 12}, "weight_map": {
                "x": "model-00001-of-00002.safetensors",
                "y": "model-00002-of-00002.safetensors"}}"#,
        )
        .unwrap();
        let w = Weights::open(&index).unwrap();
        assert_eq!(w.names(), vec!["x", "y"]);
        assert_eq!(w.get("x", &[2]).unwrap(), vec![1.0, 2.0]);
        assert_eq!(w.get("y", &[1]).unwrap(), vec![3.0]);
        let err = w.get("y", &[2]).unwrap_err();
        assert!(
            err.to_string().contains("model-00002-of-00002.safetensors"),
            "{err}"
        );

        // An index that points a tensor at the wrong shard.
        std::fs::write(
            &index,
            r#"{"weight_map": {"y": "model-00001-of-00002.safetensors"}}"#,
        )
        .unwrap();
        let err = Weights::open(&index).unwrap_err();
        assert!(
            matches!(&err, Error::MissingTensor { name, .. } if name == "y"),
            "{err:?}"
        );

        // An index that points outside the folder.
        std::fs::write(&index, r#"{"weight_map": {"y": "../elsewhere.safetensors"}}"#).unwrap();
        assert!(matches!(Weights::open(&index), Err(Error::Weights { .. })));

        // A missing shard names the shard.
        std::fs::write(&index, r#"{"weight_map": {"y": "absent.safetensors"}}"#).unwrap();
        let err = Weights::open(&index).unwrap_err();
        assert!(err.to_string().contains("absent.safetensors"), "{err}");

        std::fs::write(&index, "[]").unwrap();
        let err = Weights::open(&index).unwrap_err();
        assert!(err.to_string().contains("not a safetensors shard index"), "{err}");
    }

    /// Opens `bytes` as a weights file and reads every tensor; only the absence of panics
    /// matters to the caller.
    fn open_and_read_all(bytes: &[u8]) {
        let path = temp_dir("prop").join("model.safetensors");
        std::fs::write(&path, bytes).unwrap();
        if let Ok(w) = Weights::open(&path) {
            for name in w.names() {
                let shape = w.shape(name).unwrap().to_vec();
                let _ = w.get(name, &shape);
                let _ = w.raw(name);
            }
        }
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn truncation_never_panics(cut in 0usize..1000) {
            let bytes = sample_bytes();
            let cut = cut % (bytes.len() + 1);
            open_and_read_all(&bytes[..cut]);
        }

        #[test]
        fn corruption_never_panics(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
            let mut bytes = sample_bytes();
            let len = bytes.len();
            for (at, value) in flips {
                bytes[at % len] ^= value | 1;
            }
            open_and_read_all(&bytes);
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        // Exhaustive over the small sample: no prefix of a valid file is itself valid.
        let bytes = sample_bytes();
        for cut in 0..bytes.len() {
            let path = temp_dir("cut").join("model.safetensors");
            std::fs::write(&path, &bytes[..cut]).unwrap();
            assert!(Weights::open(&path).is_err(), "prefix of {cut} bytes opened");
            let _ = std::fs::remove_dir_all(path.parent().unwrap());
        }
    }
}
