//! Checkpoints of a training run (SFT and RL): trainable weights, AdamW moments, the step and
//! what else the run needs to go on (RL's data position), swapped in atomically, and resumed
//! only by a run with the same settings.

use std::collections::BTreeMap;
use std::path::Path;

use burn::prelude::*;

use super::optim::{AdamWState, trainable};
use crate::error::{Result, TrainError};
use crate::model::Decoder;
use crate::weights::{HostTensor, SaveDtype, WeightMap, read_safetensors, write_safetensors};

/// Writes trainable weights, optimizer moments, the step and `extra`, replacing the previous
/// checkpoint atomically (a kill leaves either the old or the new one). `run` is the run's
/// settings key: only a run with the same key resumes from it.
pub(crate) fn save_checkpoint(
    dir: &Path,
    run: &str,
    decoder: &Decoder,
    state: &AdamWState,
    extra: serde_json::Value,
) -> Result<()> {
    let staging = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| TrainError::io(&staging, e))?;
    let host = |map: &BTreeMap<String, Tensor<1>>, prefix: &str| -> WeightMap {
        map.iter().map(|(k, t)| (format!("{prefix}{k}"), HostTensor::from_tensor(t))).collect()
    };
    write_safetensors(&host(&trainable(decoder), ""), SaveDtype::F32, &staging.join("params.safetensors"))?;
    let mut moments = host(&state.m, "m.");
    moments.extend(host(&state.v, "v."));
    write_safetensors(&moments, SaveDtype::F32, &staging.join("optimizer.safetensors"))?;
    let meta = serde_json::json!({"step": state.step, "run": run, "extra": extra});
    let meta_path = staging.join("state.json");
    std::fs::write(&meta_path, meta.to_string()).map_err(|e| TrainError::io(&meta_path, e))?;
    let old = dir.with_extension("old");
    let _ = std::fs::remove_dir_all(&old);
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(|e| TrainError::io(dir, e))?;
    }
    std::fs::rename(&staging, dir).map_err(|e| TrainError::io(&staging, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// Trainable weights by path, optimizer state, and the `extra` saved with them.
pub(crate) type Checkpoint = (BTreeMap<String, Tensor<1>>, AdamWState, serde_json::Value);

/// The checkpoint in `dir` (or the previous one, if a kill came mid-swap) when it belongs to
/// the run keyed `run`; a checkpoint of different settings is an error rather than silently
/// mixed in.
pub(crate) fn load_checkpoint(dir: &Path, run: &str, device: &Device) -> Result<Option<Checkpoint>> {
    let dir = [dir.to_path_buf(), dir.with_extension("old")].into_iter().find(|d| d.join("state.json").is_file());
    let Some(dir) = dir else { return Ok(None) };
    let meta_path = dir.join("state.json");
    let text = std::fs::read_to_string(&meta_path).map_err(|e| TrainError::io(&meta_path, e))?;
    let meta: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| TrainError::invalid(&meta_path, e.to_string()))?;
    if meta["run"].as_str() != Some(run) {
        return Err(TrainError::invalid(
            &meta_path,
            "this checkpoint was written with other settings: delete the output directory or choose another",
        ));
    }
    let device_tensor =
        |t: &HostTensor| Tensor::<1>::from_data(TensorData::new(t.data.clone(), [t.data.len()]), device);
    let params = read_safetensors(&dir.join("params.safetensors"))?;
    let params = params.iter().map(|(k, t)| (k.clone(), device_tensor(t))).collect();
    let mut state = AdamWState { step: meta["step"].as_u64().unwrap_or(0), ..AdamWState::default() };
    for (k, t) in read_safetensors(&dir.join("optimizer.safetensors"))? {
        match k.split_once('.') {
            Some(("m", key)) => state.m.insert(key.to_string(), device_tensor(&t)),
            Some(("v", key)) => state.v.insert(key.to_string(), device_tensor(&t)),
            _ => None,
        };
    }
    Ok(Some((params, state, meta["extra"].clone())))
}
