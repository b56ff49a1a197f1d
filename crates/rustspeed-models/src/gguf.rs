//! GGUF (llama.cpp's model file), versions 2 and 3: metadata, tensor infos, and dequantization of
//! F32, F16, BF16, Q8_0, Q4_0 and Q4_1 into f32, so llama.cpp's published models can be loaded
//! into the HF-named layers here.
//!
//! Layout: magic `GGUF`, u32 version, u64 tensor count, u64 metadata count, the metadata
//! key/values, the tensor infos (name, dims with the fastest-varying first, ggml type, offset),
//! then the tensor data at the next multiple of `general.alignment` (default 32). All
//! little-endian. An HF `[out, in]` matrix is a GGUF tensor with dims `[in, out]`.
//!
//! llama.cpp's converter permutes the rows of `q_proj`/`k_proj` so that its RoPE can rotate
//! adjacent pairs; HF's rotates the two halves of each head, so [`GgufFile::hf_tensor`] undoes it.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};

use crate::hf_config::{HfConfigError, ModelConfig};
use crate::tokenizer::{ByteLevelBpe, PreTokenizer, Tokenizer, TokenizerError};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a valid GGUF file at byte {offset}: {message}")]
    Format {
        path: PathBuf,
        offset: usize,
        message: String,
    },
    #[error("{path}: GGUF version {version} is not supported; supported: 2, 3")]
    Version { path: PathBuf, version: u32 },
    #[error("{path}: metadata `{key}` is missing{context}")]
    MissingKey {
        path: PathBuf,
        key: String,
        context: String,
    },
    #[error("{path}: metadata `{key}` is {got}, expected {expected}")]
    WrongType {
        path: PathBuf,
        key: String,
        got: String,
        expected: &'static str,
    },
    #[error("{path}: tensor `{tensor}` has ggml type {ggml_type}; supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1")]
    TensorType {
        path: PathBuf,
        tensor: String,
        ggml_type: String,
    },
    #[error("{path}: {what} = {value:?} is not supported; supported: {supported}")]
    Unsupported {
        path: PathBuf,
        what: String,
        value: String,
        supported: String,
    },
    #[error("{path}: tensor `{name}` {message}")]
    Tensor {
        path: PathBuf,
        name: String,
        message: String,
    },
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Config(#[from] HfConfigError),
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// Any integer type that fits, as GGUF writers differ in which width they use.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    fn describe(&self) -> String {
        match self {
            Value::Array(a) => format!("an array of {}", a.len()),
            Value::String(s) => format!("the string {s:?}"),
            other => format!("{other:?}"),
        }
    }
}

/// The ggml tensor types this loader reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q8_0,
}

impl GgmlType {
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// (elements per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            // f16 scale + 16 bytes of nibbles; Q4_1 adds an f16 minimum; Q8_0: f16 scale + 32 i8.
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q8_0 => (32, 34),
        }
    }
}

/// ggml's names for the types this loader refuses, for the error message.
fn ggml_type_name(id: u32) -> String {
    let names = [
        "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K",
        "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL",
        "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16",
    ];
    match names.get(id as usize) {
        Some(name) => format!("{name} ({id})"),
        None => format!("{id}"),
    }
}

/// Dequantizes `bytes` (whole blocks of `ty`) into `out`, one f32 per element.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    let (per_block, block_bytes) = ty.block();
    assert_eq!(
        bytes.len() / block_bytes * per_block,
        out.len(),
        "dequantize: {} bytes of {ty:?} for {} values",
        bytes.len(),
        out.len()
    );
    let half_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    let blocks = bytes
        .chunks_exact(block_bytes)
        .zip(out.chunks_exact_mut(per_block));
    match ty {
        GgmlType::F32 => {
            for (b, o) in blocks {
                o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (b, o) in blocks {
                o[0] = half_at(b, 0);
            }
        }
        GgmlType::BF16 => {
            for (b, o) in blocks {
                o[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        // Low nibbles hold elements 0..16 of the block, high nibbles 16..32.
        GgmlType::Q4_0 => {
            for (b, o) in blocks {
                let d = half_at(b, 0);
                for (j, &q) in b[2..18].iter().enumerate() {
                    o[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
                    o[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (b, o) in blocks {
                let d = half_at(b, 0);
                let m = half_at(b, 2);
                for (j, &q) in b[4..20].iter().enumerate() {
                    o[j] = (q & 0x0f) as f32 * d + m;
                    o[j + 16] = (q >> 4) as f32 * d + m;
                }
            }
        }
        GgmlType::Q8_0 => {
            for (b, o) in blocks {
                let d = half_at(b, 0);
                for (j, &q) in b[2..34].iter().enumerate() {
                    o[j] = q as i8 as f32 * d;
                }
            }
        }
    }
}

/// One tensor's description.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` varies fastest (the reverse of the HF/numpy shape).
    pub dims: Vec<usize>,
    /// The raw ggml type id (see [`GgmlType::from_id`]).
    pub type_id: u32,
    /// Byte offset from the start of the data section.
    pub offset: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    /// The HF/numpy shape (`dims` reversed).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }
}

enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file; tensor data stays in the (memory-mapped) file until asked for.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    /// In file order.
    pub tensors: Vec<TensorInfo>,
    data_start: usize,
    bytes: Bytes,
}

/// Reads little-endian values, every error naming the byte offset.
struct Cursor<'a> {
    path: &'a Path,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn err(&self, message: impl Into<String>) -> GgufError {
        GgufError::Format {
            path: self.path.to_path_buf(),
            offset: self.pos,
            message: message.into(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], GgufError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or_else(|| self.err(format!("truncated: {n} more bytes expected")))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        Ok(self.take(N)?.try_into().expect("length checked"))
    }

    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A count or length that must fit in memory (guards against a corrupt length allocating).
    fn len(&mut self) -> Result<usize, GgufError> {
        let n = self.u64()?;
        if n > self.buf.len() as u64 {
            return Err(self.err(format!("length {n} exceeds the file size")));
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String, GgufError> {
        let n = self.len()?;
        let bytes = self.take(n)?;
        // Some converters wrote vocabularies with invalid UTF-8; keep going with replacements.
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    fn value(&mut self, ty: u32) -> Result<Value, GgufError> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(self.array::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.err(format!("bool byte {b}, expected 0 or 1"))),
            },
            8 => Value::String(self.string()?),
            9 => {
                let elem = self.u32()?;
                if elem == 9 {
                    // Nested arrays are legal but no model uses them; each level re-reads its type.
                    let n = self.len()?;
                    let mut items = Vec::with_capacity(n.min(1 << 16));
                    for _ in 0..n {
                        let inner = self.u32()?;
                        items.push(self.value_array(inner)?);
                    }
                    Value::Array(items)
                } else {
                    self.value_array(elem)?
                }
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(self.err(format!("unknown metadata value type {other}"))),
        })
    }

    fn value_array(&mut self, elem: u32) -> Result<Value, GgufError> {
        let n = self.len()?;
        let mut items = Vec::with_capacity(n.min(1 << 20));
        for _ in 0..n {
            items.push(self.value(elem)?);
        }
        Ok(Value::Array(items))
    }
}

impl GgufFile {
    /// Memory-maps and parses `path`.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let file = File::open(path).map_err(|source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: read-only mapping; a file changed underneath would give wrong values, as any
        // concurrent modification would with a buffered reader.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        GgufFile::parse(path, Bytes::Mapped(map))
    }

    /// Parses a GGUF file held in memory; `path` only names it in errors.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        GgufFile::parse(path, Bytes::Owned(bytes))
    }

    fn parse(path: &Path, bytes: Bytes) -> Result<GgufFile, GgufError> {
        let mut c = Cursor {
            path,
            buf: &bytes,
            pos: 0,
        };
        if c.take(4).ok() != Some(MAGIC.as_slice()) {
            c.pos = 0;
            return Err(c.err("missing the `GGUF` magic"));
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version {
                path: path.to_path_buf(),
                version,
            });
        }
        let n_tensors = c.len()?;
        let n_kv = c.len()?;
        let mut metadata = HashMap::with_capacity(n_kv);
        for _ in 0..n_kv {
            let key = c.string()?;
            let ty = c.u32()?;
            let value = c.value(ty)?;
            metadata.insert(key, value);
        }
        let mut tensors = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string()?;
            let n_dims = c.u32()? as usize;
            if n_dims > 4 {
                return Err(c.err(format!("tensor `{name}` has {n_dims} dims; ggml allows 4")));
            }
            let dims = (0..n_dims)
                .map(|_| c.len())
                .collect::<Result<Vec<_>, _>>()?;
            let type_id = c.u32()?;
            let offset = c.len()?;
            tensors.push(TensorInfo {
                name,
                dims,
                type_id,
                offset,
            });
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => v.as_u64().filter(|a| a.is_power_of_two()).ok_or_else(|| {
                c.err(format!(
                    "general.alignment = {v:?}, expected a power of two"
                ))
            })?,
        } as usize;
        let data_start = c.pos.div_ceil(alignment) * alignment;
        let file = GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            data_start,
            bytes,
        };
        for t in &file.tensors {
            file.tensor_bytes(t)?;
        }
        Ok(file)
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    fn tensor_err(&self, name: &str, message: impl Into<String>) -> GgufError {
        GgufError::Tensor {
            path: self.path.clone(),
            name: name.to_string(),
            message: message.into(),
        }
    }

    /// The tensor's type and raw bytes, checked against the file's extent.
    fn tensor_bytes(&self, t: &TensorInfo) -> Result<(GgmlType, &[u8]), GgufError> {
        let ty = GgmlType::from_id(t.type_id).ok_or_else(|| GgufError::TensorType {
            path: self.path.clone(),
            tensor: t.name.clone(),
            ggml_type: ggml_type_name(t.type_id),
        })?;
        let (per_block, block_bytes) = ty.block();
        let row = t.dims.first().copied().unwrap_or(1);
        if row % per_block != 0 {
            return Err(self.tensor_err(
                &t.name,
                format!("has rows of {row}, not a multiple of the {ty:?} block of {per_block}"),
            ));
        }
        let len = t.numel() / per_block * block_bytes;
        let start = self.data_start + t.offset;
        if start + len > self.bytes.len() {
            return Err(self.tensor_err(
                &t.name,
                format!(
                    "at offset {} with {len} bytes runs past the end of the file ({} bytes)",
                    t.offset,
                    self.bytes.len()
                ),
            ));
        }
        Ok((ty, &self.bytes[start..start + len]))
    }

    /// The named tensor dequantized to f32, in ggml order (row-major over the HF shape).
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let t = self
            .tensor_info(name)
            .ok_or_else(|| self.tensor_err(name, "is not in the file"))?;
        let (ty, bytes) = self.tensor_bytes(t)?;
        let mut out = vec![0f32; t.numel()];
        dequantize(ty, bytes, &mut out);
        Ok(out)
    }

    fn require(&self, key: &str, context: &str) -> Result<&Value, GgufError> {
        self.get(key).ok_or_else(|| GgufError::MissingKey {
            path: self.path.clone(),
            key: key.to_string(),
            context: context.to_string(),
        })
    }

    fn wrong(&self, key: &str, v: &Value, expected: &'static str) -> GgufError {
        GgufError::WrongType {
            path: self.path.clone(),
            key: key.to_string(),
            got: v.describe(),
            expected,
        }
    }

    fn req_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.require(key, "")?;
        v.as_u64().ok_or_else(|| self.wrong(key, v, "an integer"))
    }

    fn opt_u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        self.get(key)
            .map(|v| v.as_u64().ok_or_else(|| self.wrong(key, v, "an integer")))
            .transpose()
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>, GgufError> {
        self.get(key)
            .map(|v| v.as_f64().ok_or_else(|| self.wrong(key, v, "a number")))
            .transpose()
    }

    fn opt_str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        self.get(key)
            .map(|v| v.as_str().ok_or_else(|| self.wrong(key, v, "a string")))
            .transpose()
    }

    fn unsupported(&self, what: &str, value: impl ToString, supported: &str) -> GgufError {
        GgufError::Unsupported {
            path: self.path.clone(),
            what: what.to_string(),
            value: value.to_string(),
            supported: supported.to_string(),
        }
    }

    /// The HF `config.json` equivalent of the `llama.*` metadata, as transformers' GGUF loader
    /// would build it; embeddings are tied when the file has no `output.weight`.
    pub fn config_json(&self) -> Result<serde_json::Value, GgufError> {
        let arch = self.opt_str("general.architecture")?.unwrap_or("(absent)");
        if arch != "llama" {
            return Err(self.unsupported("general.architecture", arch, "llama"));
        }
        let hidden = self.req_u64("llama.embedding_length")?;
        let heads = self.req_u64("llama.attention.head_count")?;
        let kv_heads = self
            .opt_u64("llama.attention.head_count_kv")?
            .unwrap_or(heads);
        let head_dim = match self.opt_u64("llama.attention.key_length")? {
            Some(d) => d,
            None if heads > 0 => hidden / heads,
            None => 0,
        };
        if let Some(rot) = self.opt_u64("llama.rope.dimension_count")? {
            if rot != head_dim {
                return Err(self.unsupported(
                    "llama.rope.dimension_count",
                    rot,
                    &format!("the head dimension {head_dim} (partial rotary is not implemented)"),
                ));
            }
        }
        let vocab = match self.opt_u64("llama.vocab_size")? {
            Some(v) => v,
            None => match self.tensor_info("token_embd.weight") {
                Some(t) if t.dims.len() == 2 => t.dims[1] as u64,
                _ => {
                    return Err(self
                        .require("llama.vocab_size", " (and no token_embd.weight)")
                        .unwrap_err())
                }
            },
        };
        let mut cfg = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": self.req_u64("llama.feed_forward_length")?,
            "num_hidden_layers": self.req_u64("llama.block_count")?,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "max_position_embeddings": self.req_u64("llama.context_length")?,
            "rms_norm_eps": self.opt_f64("llama.attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
            "rope_theta": self.opt_f64("llama.rope.freq_base")?.unwrap_or(10000.0),
            "tie_word_embeddings": self.tensor_info("output.weight").is_none(),
            "attention_bias": self.tensor_info("blk.0.attn_q.bias").is_some(),
        });
        match self.opt_str("llama.rope.scaling.type")? {
            None | Some("none") => {}
            Some("linear") => {
                let factor = self.opt_f64("llama.rope.scaling.factor")?.unwrap_or(1.0);
                cfg["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": factor});
            }
            Some(other) => {
                return Err(self.unsupported("llama.rope.scaling.type", other, "none, linear"))
            }
        }
        for (key, hf) in [
            ("tokenizer.ggml.bos_token_id", "bos_token_id"),
            ("tokenizer.ggml.eos_token_id", "eos_token_id"),
            ("tokenizer.ggml.padding_token_id", "pad_token_id"),
        ] {
            if let Some(id) = self.opt_u64(key)? {
                cfg[hf] = id.into();
            }
        }
        Ok(cfg)
    }

    pub fn model_config(&self) -> Result<ModelConfig, GgufError> {
        let json = self.config_json()?;
        Ok(ModelConfig::from_json_str(
            &self.path.display().to_string(),
            &json.to_string(),
        )?)
    }

    /// The embedded tokenizer (`tokenizer.ggml.*`). Only byte-level BPE (`model = gpt2`) is
    /// implemented; SentencePiece (`llama`) vocabularies are refused.
    pub fn tokenizer(&self) -> Result<Tokenizer, GgufError> {
        let model = self.opt_str("tokenizer.ggml.model")?.unwrap_or("(absent)");
        if model != "gpt2" {
            return Err(self.unsupported(
                "tokenizer.ggml.model",
                model,
                "gpt2 (byte-level BPE); SentencePiece `llama` vocabularies are not implemented",
            ));
        }
        let pre = self.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");
        let pre_tokenizer = match pre {
            "default" | "gpt2" | "gpt-2" => PreTokenizer::Gpt2,
            "smollm" => PreTokenizer::DigitsThenGpt2,
            "llama-bpe" | "llama3" => PreTokenizer::Llama3,
            other => {
                return Err(self.unsupported(
                    "tokenizer.ggml.pre",
                    other,
                    "default, gpt2, smollm, llama-bpe",
                ))
            }
        };
        let strings = |key: &str| -> Result<Vec<String>, GgufError> {
            let v = self.require(key, " (the embedded tokenizer needs it)")?;
            let items = v
                .as_array()
                .ok_or_else(|| self.wrong(key, v, "an array of strings"))?;
            items
                .iter()
                .map(|s| {
                    s.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| self.wrong(key, s, "an array of strings"))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| match m.split_once(' ') {
                Some((a, b)) => Ok((a.to_string(), b.to_string())),
                None => Err(self.unsupported("tokenizer.ggml.merges entry", m, "`left right`")),
            })
            .collect::<Result<Vec<_>, _>>()?;
        // llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
        let mut special = Vec::new();
        let mut user_defined = Vec::new();
        if let Some(v) = self.get("tokenizer.ggml.token_type") {
            let types = v.as_array().ok_or_else(|| {
                self.wrong("tokenizer.ggml.token_type", v, "an array of integers")
            })?;
            for (id, ty) in types.iter().enumerate() {
                match ty.as_u64() {
                    Some(3) => special.push(id as u32),
                    Some(4) => user_defined.push(id as u32),
                    _ => {}
                }
            }
        }
        let id = |key: &str| -> Result<Option<u32>, GgufError> {
            Ok(self.opt_u64(key)?.map(|v| v as u32))
        };
        let flag = |key: &str| self.get(key).and_then(Value::as_bool).unwrap_or(false);
        Ok(ByteLevelBpe {
            tokens,
            merges,
            special,
            user_defined,
            pre_tokenizer,
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            add_bos: flag("tokenizer.ggml.add_bos_token"),
            add_eos: flag("tokenizer.ggml.add_eos_token"),
        }
        .build(&self.path.display().to_string())?)
    }

    /// (GGUF name, HF name) of every tensor; a tensor with no HF LLaMA equivalent is an error.
    pub fn hf_names(&self) -> Result<Vec<(String, String)>, GgufError> {
        self.tensors
            .iter()
            .map(|t| {
                hf_name(&t.name)
                    .map(|hf| (t.name.clone(), hf))
                    .ok_or_else(|| self.tensor_err(&t.name, "has no HF LLaMA equivalent"))
            })
            .collect()
    }

    /// The GGUF tensor `name` dequantized, in HF layout: q/k rows un-permuted with `heads` /
    /// `kv_heads` (from the model config).
    pub fn hf_tensor(
        &self,
        name: &str,
        heads: usize,
        kv_heads: usize,
    ) -> Result<Vec<f32>, GgufError> {
        let mut values = self.tensor_f32(name)?;
        let n_head = if name.contains(".attn_q.") {
            heads
        } else if name.contains(".attn_k.") {
            kv_heads
        } else {
            return Ok(values);
        };
        let t = self.tensor_info(name).expect("read above");
        let rows = t.shape()[0];
        let row_len = values.len() / rows;
        if n_head == 0 || !rows.is_multiple_of(2 * n_head) {
            return Err(self.tensor_err(
                name,
                format!("has {rows} rows, not a multiple of 2 x {n_head} heads"),
            ));
        }
        values = unpermute_rope_rows(&values, rows, row_len, n_head);
        Ok(values)
    }
}

/// Inverse of llama.cpp's `permute(w, n_head)`: within each head of `d` rows, GGUF row `2j + h`
/// is HF row `h * d/2 + j` (h = 0, 1 picks the half).
pub fn unpermute_rope_rows(values: &[f32], rows: usize, row_len: usize, n_head: usize) -> Vec<f32> {
    let d = rows / n_head;
    let half = d / 2;
    let mut out = vec![0f32; values.len()];
    for head in 0..n_head {
        for h in 0..2 {
            for j in 0..half {
                let dst = (head * d + h * half + j) * row_len;
                let src = (head * d + 2 * j + h) * row_len;
                out[dst..dst + row_len].copy_from_slice(&values[src..src + row_len]);
            }
        }
    }
    out
}

/// The HF LLaMA name of a llama.cpp tensor name.
pub fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.split_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let hf_module = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf_module}.{suffix}"))
}
