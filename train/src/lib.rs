//! kiln's decoder LLM in burn: the Llama/Qwen2 model, weights from safetensors and GGUF, the
//! tokenizer and chat template, generation, an OpenAI-compatible server and the SFT trainer.

pub mod backprop;
pub mod config;
pub mod error;
pub mod model;
pub mod weights;

pub use config::ModelConfig;
pub use error::{Result, TrainError};
pub use model::{Batch, Decoder, KvCache};
pub mod chat;
pub mod decode;
pub mod fetch;
pub mod gguf;
pub mod loader;
pub mod tokenizer;
pub use loader::LoadedModel;
pub mod generate;
pub mod kernels;
pub mod learned;
pub mod serve;

/// The device models run on: the first CUDA GPU when kiln is built with the `cuda` feature
/// (unless `KILN_DEVICE=cpu`), else the CPU through burn's flex backend.
pub fn default_device() -> burn::prelude::Device {
    #[cfg(feature = "cuda")]
    if std::env::var("KILN_DEVICE").as_deref() != Ok("cpu") {
        kernels::keep_compiled_kernels();
        return burn::prelude::Device::cuda(0);
    }
    burn::prelude::Device::flex()
}
pub mod rl;
pub mod sft;
pub mod stage;

/// The paths [`kiln_stages::with_agent_keys!`] names for its defaults (`crate::agent::keys`),
/// so that the RL settings declare the agent's keys as every agent stage does.
#[doc(hidden)]
pub mod agent {
    pub use kiln_stages::agent::keys;
}
