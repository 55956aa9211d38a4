//! AdamW with decoupled weight decay, the cosine schedule with linear warmup, and clipping by the
//! global gradient norm (burn's clipping is per tensor). Moments are kept by parameter path, so
//! they are saved with a checkpoint and found again after a restart (burn's parameter ids are
//! not stable across processes).

use std::collections::BTreeMap;

use burn::module::{ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::prelude::*;

/// AdamW settings.
#[derive(Clone, Debug)]
pub struct AdamWSettings {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// AdamW moments, flattened, by parameter path.
#[derive(Debug, Default)]
pub struct AdamWState {
    /// Updates applied so far.
    pub step: u64,
    pub m: BTreeMap<String, Tensor<1>>,
    pub v: BTreeMap<String, Tensor<1>>,
}

/// Learning rate at `step` (0-based): linear warmup to `peak`, then cosine decay to 10% of it.
pub fn cosine_lr(step: u64, warmup: u64, total: u64, peak: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    let floor = 0.1 * peak;
    floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// The global L2 norm of every gradient in `grads` that belongs to `module`.
pub fn global_norm<M: Module>(module: &M, grads: &GradientsParams) -> f64 {
    struct Norm<'a> {
        grads: &'a GradientsParams,
        sum: f64,
    }
    impl ModuleVisitor for Norm<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                self.sum += g.powi_scalar(2).sum().into_scalar::<f32>() as f64;
            }
        }
    }
    let mut norm = Norm { grads, sum: 0.0 };
    module.visit(&mut norm);
    norm.sum.sqrt()
}

/// Applies one AdamW update to every parameter with a gradient, gradients scaled by `scale`
/// (the clipping factor).
pub fn step<M: Module>(
    module: M,
    grads: &mut GradientsParams,
    state: &mut AdamWState,
    settings: &AdamWSettings,
    lr: f64,
    scale: f64,
) -> M {
    state.step += 1;
    let mut update = Update { path: Vec::new(), grads, state, settings, lr, scale };
    module.map(&mut update)
}

struct Update<'a> {
    path: Vec<String>,
    grads: &'a mut GradientsParams,
    state: &'a mut AdamWState,
    settings: &'a AdamWSettings,
    lr: f64,
    scale: f64,
}

impl ModuleMapper for Update<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let id: ParamId = param.id;
        let Some(grad) = self.grads.remove::<D>(id) else {
            return param;
        };
        let (id, tensor, mapper) = param.consume();
        let shape = tensor.dims();
        let n: usize = shape.iter().product();
        let key = self.path.join(".");
        let s = self.settings;
        let g = grad.inner().reshape([n]).mul_scalar(self.scale);
        let m = match self.state.m.remove(&key) {
            Some(m) => m.mul_scalar(s.beta1) + g.clone().mul_scalar(1.0 - s.beta1),
            None => g.clone().mul_scalar(1.0 - s.beta1),
        };
        let v = match self.state.v.remove(&key) {
            Some(v) => v.mul_scalar(s.beta2) + g.powi_scalar(2).mul_scalar(1.0 - s.beta2),
            None => g.powi_scalar(2).mul_scalar(1.0 - s.beta2),
        };
        let t = self.state.step as i32;
        let m_hat = m.clone().div_scalar(1.0 - s.beta1.powi(t));
        let v_hat = v.clone().div_scalar(1.0 - s.beta2.powi(t));
        let w = tensor.inner().reshape([n]);
        let decayed = w.mul_scalar(1.0 - self.lr * s.weight_decay);
        let updated = decayed - m_hat.div(v_hat.sqrt().add_scalar(s.eps)).mul_scalar(self.lr);
        self.state.m.insert(key.clone(), m);
        self.state.v.insert(key, v);
        let updated = Tensor::from_inner(updated.reshape(shape)).require_grad();
        Param::from_mapped_value(id, updated, mapper)
    }
}

/// Every parameter that requires a gradient, by path.
pub fn trainable<M: Module>(module: &M) -> BTreeMap<String, Tensor<1>> {
    struct Collect {
        path: Vec<String>,
        out: BTreeMap<String, Tensor<1>>,
    }
    impl ModuleVisitor for Collect {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let value = param.val();
            if value.is_require_grad() {
                let n: usize = value.dims().iter().product();
                self.out.insert(self.path.join("."), value.inner().reshape([n]));
            }
        }
    }
    let mut collect = Collect { path: Vec::new(), out: BTreeMap::new() };
    module.visit(&mut collect);
    collect.out
}

/// Replaces parameters by path with `values` (flattened), keeping their shape and gradient flag.
pub fn restore<M: Module>(module: M, values: &BTreeMap<String, Tensor<1>>) -> M {
    struct Restore<'a> {
        path: Vec<String>,
        values: &'a BTreeMap<String, Tensor<1>>,
    }
    impl ModuleMapper for Restore<'_> {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let Some(value) = self.values.get(&self.path.join(".")) else {
                return param;
            };
            let (id, tensor, mapper) = param.consume();
            let grad = tensor.is_require_grad();
            let mut restored = Tensor::from_inner(value.clone().reshape(tensor.dims()));
            if grad {
                restored = restored.require_grad();
            }
            Param::from_mapped_value(id, restored, mapper)
        }
    }
    module.map(&mut Restore { path: Vec::new(), values })
}
