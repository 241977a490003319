//! Writes `.safetensors` files one tensor at a time (peak memory: the largest tensor, not the
//! model), with the `{"format": "pt"}` metadata Hugging Face `transformers` looks for.
//! Reading goes through tch.

use crate::TorchResult;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use serde_json::{Map, Value, json};
use tch::{Device, Kind, Tensor};

use autoscale_train::error::TrainError;

fn dtype(kind: Kind) -> Result<&'static str, TrainError> {
    Ok(match kind {
        Kind::Float => "F32",
        Kind::BFloat16 => "BF16",
        Kind::Half => "F16",
        Kind::Double => "F64",
        Kind::Int64 => "I64",
        Kind::Int => "I32",
        other => return Err(TrainError::torch(format!("cannot save {other:?} tensors"))),
    })
}

/// Writes `tensors` to `path` (via a temp file and a rename, so a reader never sees half a file).
pub fn write(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), TrainError> {
    let mut header = Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0u64;
    for (name, t) in tensors {
        let bytes = (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        header.insert(
            name.clone(),
            json!({"dtype": dtype(t.kind())?, "shape": t.size(), "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut text = Value::Object(header).to_string().into_bytes();
    // The data starts 8-byte aligned.
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let tmp = path.with_extension("safetensors.tmp");
    let file = File::create(&tmp).map_err(|e| TrainError::io("create", &tmp, e))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let io = |e| TrainError::io("write", &tmp, e);
    out.write_all(&(text.len() as u64).to_le_bytes())
        .map_err(io)?;
    out.write_all(&text).map_err(io)?;
    for (_, t) in tensors {
        let t = t.to_device(Device::Cpu).contiguous();
        let n = t.numel() * t.kind().elt_size_in_bytes();
        let mut buf = vec![0u8; n];
        t.f_copy_data_u8(&mut buf, t.numel()).torch()?;
        out.write_all(&buf).map_err(io)?;
    }
    let file = out
        .into_inner()
        .map_err(|e| TrainError::io("write", &tmp, e.into_error()))?;
    file.sync_all()
        .map_err(|e| TrainError::io("sync", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| TrainError::io("rename into place", path, e))?;
    Ok(())
}

/// Every tensor of a `.safetensors` file, by name.
pub fn read(path: &Path) -> Result<Vec<(String, Tensor)>, TrainError> {
    Tensor::read_safetensors(path).map_err(|e| TrainError::Data {
        path: path.to_path_buf(),
        message: format!("cannot read the tensors: {e}"),
        hint: None,
    })
}
