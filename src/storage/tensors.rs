//! Named tensors as safetensors bytes (the format: <https://github.com/huggingface/safetensors>):
//! what checkpoints and the label-embedding file are made of. Float32, float64 and int64, the
//! dtypes this crate stores.
use anyhow::{bail, Context, Result};
use std::borrow::Cow;
use tch::{Kind, Tensor};

/// The safetensors name of a tensor dtype (`F32`, `F64`, `I64`, ...), for messages.
pub fn dtype_name(kind: Kind) -> String {
    match kind {
        Kind::Float => "F32".into(),
        Kind::Double => "F64".into(),
        Kind::Half => "F16".into(),
        Kind::BFloat16 => "BF16".into(),
        Kind::Int64 => "I64".into(),
        Kind::Int => "I32".into(),
        Kind::Int16 => "I16".into(),
        Kind::Int8 => "I8".into(),
        Kind::Uint8 => "U8".into(),
        Kind::Bool => "BOOL".into(),
        other => format!("{other:?}"),
    }
}

/// Serialises named tensors (float32/float64/int64, any device) to safetensors bytes.
pub fn tensors_to_safetensors(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    struct Owned {
        dtype: safetensors::Dtype,
        shape: Vec<usize>,
        data: Vec<u8>,
    }
    impl safetensors::View for &Owned {
        fn dtype(&self) -> safetensors::Dtype {
            self.dtype
        }
        fn shape(&self) -> &[usize] {
            &self.shape
        }
        fn data(&self) -> Cow<'_, [u8]> {
            Cow::Borrowed(&self.data)
        }
        fn data_len(&self) -> usize {
            self.data.len()
        }
    }
    let mut owned = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.detach().to_device(tch::Device::Cpu).contiguous();
        let dtype = match t.kind() {
            Kind::Float => safetensors::Dtype::F32,
            Kind::Double => safetensors::Dtype::F64,
            Kind::Int64 => safetensors::Dtype::I64,
            other => bail!("tensor '{name}': dtype {other:?} is not supported in checkpoints"),
        };
        let numel = t.numel();
        let mut data = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.copy_data_u8(&mut data, numel);
        let shape = t.size().iter().map(|&d| d as usize).collect();
        owned.push((name.clone(), Owned { dtype, shape, data }));
    }
    let views: Vec<(String, &Owned)> = owned.iter().map(|(n, o)| (n.clone(), o)).collect();
    Ok(safetensors::serialize(views, None)?)
}

/// Parses safetensors bytes into named CPU tensors, sorted by name. `source` names the file in errors.
pub fn safetensors_to_tensors(bytes: &[u8], source: &str) -> Result<Vec<(String, Tensor)>> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .with_context(|| format!("{source}: not a valid safetensors file"))?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let kind = match view.dtype() {
            safetensors::Dtype::F32 => Kind::Float,
            safetensors::Dtype::F64 => Kind::Double,
            safetensors::Dtype::I64 => Kind::Int64,
            other => bail!("{source}: tensor '{name}' has unsupported dtype {other:?}"),
        };
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        out.push((name, Tensor::from_data_size(view.data(), &shape, kind)));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}
