//! Optimizers with state of our own, so a checkpoint holds it as named tensors and a resume
//! continues bit-identically: SGD with momentum (PyTorch `torch.optim.SGD` semantics) and Adagrad
//! (the paper's optimizer, appendix A.1; PyTorch `torch.optim.Adagrad` semantics). Plus the
//! learning-rate schedule (linear warmup, then cosine or constant).
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tch::Tensor;

/// Optimizer algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    /// `buf = momentum * buf + g; p -= lr * buf` (PyTorch SGD, dampening 0, not Nesterov).
    Sgd,
    /// `sum += g * g; p -= lr * g / (sqrt(sum) + eps)` (PyTorch Adagrad, lr_decay 0).
    Adagrad,
}

deserialize_by_name!(Algorithm);

/// Decay after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    /// Half-cosine from `lr` to `lr * final_lr_fraction` over the stage's remaining steps.
    #[default]
    Cosine,
    /// `lr` after warmup.
    Constant,
}

deserialize_by_name!(Schedule);

/// `train.non_finite`: the policy for a non-finite loss or gradient on any rank: the optimizer's
/// update is skipped on every rank, or every rank stops (the training loop applies it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NonFinite {
    /// Every rank stops with an error.
    #[default]
    Stop,
    /// Every rank skips the update and goes on.
    Skip,
}

deserialize_by_name!(NonFinite);

/// Optimizer and schedule of one training stage (`[train.softmax]`, `[train.devise]`, ...).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Algorithm: `sgd` or `adagrad`.
    pub algorithm: Algorithm,
    /// Peak learning rate.
    pub lr: f64,
    /// SGD momentum (ignored by Adagrad).
    #[serde(default = "default_momentum")]
    pub momentum: f64,
    /// L2 weight decay added to the gradient (`g += weight_decay * p`), both algorithms.
    #[serde(default)]
    pub weight_decay: f64,
    /// Adagrad's denominator epsilon.
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Steps of linear warmup from 0 to `lr` at the start of the stage.
    #[serde(default)]
    pub warmup_steps: u64,
    /// Decay after warmup.
    #[serde(default)]
    pub schedule: Schedule,
    /// Cosine schedule's final learning rate as a fraction of `lr`.
    #[serde(default)]
    pub final_lr_fraction: f64,
}

fn default_momentum() -> f64 {
    0.9
}
fn default_eps() -> f64 {
    1e-10
}

impl Config {
    /// Checks the stage's optimizer keys; `section` names the TOML section in errors.
    pub fn validate(&self, section: &str) -> Result<()> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("{section}.lr must be a positive number, got {}", self.lr);
        }
        if !(0.0..1.0).contains(&self.momentum) {
            bail!(
                "{section}.momentum must be in [0, 1), got {}",
                self.momentum
            );
        }
        if self.weight_decay < 0.0 || !self.weight_decay.is_finite() {
            bail!(
                "{section}.weight_decay must be >= 0, got {}",
                self.weight_decay
            );
        }
        if !(0.0..=1.0).contains(&self.final_lr_fraction) {
            bail!(
                "{section}.final_lr_fraction must be in [0, 1], got {}",
                self.final_lr_fraction
            );
        }
        Ok(())
    }

    /// Learning rate at `step_in_stage` (0-based) of a stage with `stage_steps` steps.
    pub fn lr_at(&self, step_in_stage: u64, stage_steps: u64) -> f64 {
        if step_in_stage < self.warmup_steps {
            return self.lr * (step_in_stage + 1) as f64 / self.warmup_steps as f64;
        }
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Cosine => {
                let span = stage_steps.saturating_sub(self.warmup_steps).max(1) as f64;
                let t = ((step_in_stage - self.warmup_steps) as f64 / span).min(1.0);
                let floor = self.lr * self.final_lr_fraction;
                floor + (self.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

/// An optimizer over a fixed, named, sorted list of parameters.
pub struct Optimizer {
    cfg: Config,
    params: Vec<(String, Tensor)>,
    /// Per-parameter state: SGD's momentum buffer or Adagrad's sum of squared gradients, same
    /// shape as the parameter. Named `<param>.momentum_buffer` / `<param>.sum` in checkpoints.
    state: BTreeMap<String, Tensor>,
}

impl Optimizer {
    /// A fresh optimizer (zero state) over `params` (as from `DeviseModel::parameters`).
    pub fn new(cfg: &Config, params: Vec<(String, Tensor)>) -> Optimizer {
        let state = params
            .iter()
            .map(|(name, p)| (state_name(cfg.algorithm, name), p.zeros_like().detach()))
            .collect();
        Optimizer {
            cfg: cfg.clone(),
            params,
            state,
        }
    }

    /// The parameters this optimizer updates, sorted by name.
    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// Zeroes the gradient of every parameter, in place (a gradient may be a view into a
    /// data-parallel bucket, which must stay where it is).
    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            let mut g = p.grad();
            if g.defined() {
                tch::no_grad(|| {
                    let _ = g.zero_();
                });
            }
        }
    }

    /// One update with learning rate `lr`, using each parameter's current `.grad()`.
    ///
    /// SGD runs in place with no temporaries (`buf = momentum * buf + g + weight_decay * p`,
    /// `p += (-lr) * buf`: four passes over the parameter's size, as PyTorch's
    /// single-tensor SGD), the scalars as 0-dim tensors of the parameter's kind (`addcmul_`, as
    /// tch has no `add_(other, alpha)`).
    pub fn step(&mut self, lr: f64) {
        let Some((_, first)) = self.params.first() else {
            return;
        };
        let scalar = |v: f64| {
            Tensor::from(v)
                .to_kind(first.kind())
                .to_device(first.device())
        };
        let (weight_decay, neg_lr) = (scalar(self.cfg.weight_decay), scalar(-lr));
        tch::no_grad(|| {
            for (name, p) in &self.params {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let state = self
                    .state
                    .get_mut(&state_name(self.cfg.algorithm, name))
                    .expect("state per param");
                let mut p = p.shallow_clone();
                match self.cfg.algorithm {
                    Algorithm::Sgd => {
                        let _ = state.g_mul_scalar_(self.cfg.momentum).g_add_(&g);
                        if self.cfg.weight_decay != 0.0 {
                            let _ = state.addcmul_(&p, &weight_decay);
                        }
                        let _ = p.addcmul_(state, &neg_lr);
                    }
                    Algorithm::Adagrad => {
                        let g = if self.cfg.weight_decay != 0.0 {
                            g + &p * self.cfg.weight_decay
                        } else {
                            g
                        };
                        let _ = state.addcmul_(&g, &g);
                        let _ = p.g_sub_(&(g * lr / (state.sqrt() + self.cfg.eps)));
                    }
                }
            }
        });
    }

    /// The state as named tensors for a checkpoint, sorted by name.
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        self.state
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect()
    }

    /// Restores state saved by [`Optimizer::state_dict`]; every entry must match by name, shape and dtype.
    pub fn load_state_dict(&mut self, tensors: &[(String, Tensor)]) -> Result<()> {
        if tensors.len() != self.state.len() {
            bail!(
                "optimizer state has {} tensors, expected {}",
                tensors.len(),
                self.state.len()
            );
        }
        for (name, src) in tensors {
            let Some(dst) = self.state.get_mut(name) else {
                bail!("optimizer state tensor '{name}' does not belong to this stage's optimizer");
            };
            if dst.size() != src.size() {
                bail!(
                    "optimizer state '{name}': shape {:?}, expected {:?}",
                    src.size(),
                    dst.size()
                );
            }
            if dst.kind() != src.kind() {
                bail!(
                    "optimizer state '{name}': dtype {}, expected {}",
                    crate::storage::tensors::dtype_name(src.kind()),
                    crate::storage::tensors::dtype_name(dst.kind())
                );
            }
            tch::no_grad(|| dst.copy_(src));
        }
        Ok(())
    }
}

fn state_name(algorithm: Algorithm, param: &str) -> String {
    match algorithm {
        Algorithm::Sgd => format!("{param}.momentum_buffer"),
        Algorithm::Adagrad => format!("{param}.sum"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(optimizer: Algorithm) -> Config {
        Config {
            algorithm: optimizer,
            lr: 0.5,
            momentum: 0.9,
            weight_decay: 0.0,
            eps: 1e-10,
            warmup_steps: 0,
            schedule: Schedule::Constant,
            final_lr_fraction: 0.0,
        }
    }

    fn quadratic_step(opt: &mut Optimizer, lr: f64) {
        opt.zero_grad();
        let p = &opt.params()[0].1;
        (p * p).sum(tch::Kind::Float).backward();
        opt.step(lr);
    }

    #[test]
    fn sgd_matches_pytorch_formula() {
        let p = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        let mut opt = Optimizer::new(&cfg(Algorithm::Sgd), vec![("w".into(), p.shallow_clone())]);
        quadratic_step(&mut opt, 0.1); // g = 2, buf = 2, p = 1 - 0.2 = 0.8
        quadratic_step(&mut opt, 0.1); // g = 1.6, buf = 1.8 + 1.6 = 3.4, p = 0.8 - 0.34 = 0.46
        assert!((f64::try_from(&p).unwrap() - 0.46).abs() < 1e-6);
    }

    #[test]
    fn adagrad_matches_pytorch_formula() {
        let p = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        let mut opt = Optimizer::new(
            &cfg(Algorithm::Adagrad),
            vec![("w".into(), p.shallow_clone())],
        );
        quadratic_step(&mut opt, 0.1); // g = 2, sum = 4, p = 1 - 0.1 * 2 / 2 = 0.9
        assert!((f64::try_from(&p).unwrap() - 0.9).abs() < 1e-6);
        let state = opt.state_dict();
        assert_eq!(state[0].0, "w.sum");
        assert!((f64::try_from(&state[0].1).unwrap() - 4.0).abs() < 1e-6);
    }

    #[test]
    fn state_of_another_dtype_is_refused() {
        let p = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        let mut opt = Optimizer::new(&cfg(Algorithm::Sgd), vec![("w".into(), p.shallow_clone())]);
        let state = opt.state_dict();
        opt.load_state_dict(&state).unwrap();
        let doubled = vec![(state[0].0.clone(), state[0].1.to_kind(tch::Kind::Double))];
        let err = opt.load_state_dict(&doubled).unwrap_err().to_string();
        assert!(
            err.contains("w.momentum_buffer") && err.contains("dtype F64, expected F32"),
            "{err}"
        );
    }

    #[test]
    fn schedule_warmup_then_cosine() {
        let mut c = cfg(Algorithm::Sgd);
        c.warmup_steps = 10;
        c.schedule = Schedule::Cosine;
        assert!((c.lr_at(0, 110) - 0.05).abs() < 1e-12);
        assert!((c.lr_at(9, 110) - 0.5).abs() < 1e-12);
        assert!((c.lr_at(10, 110) - 0.5).abs() < 1e-12);
        assert!((c.lr_at(60, 110) - 0.25).abs() < 1e-9);
        assert!(c.lr_at(109, 110) < 0.001);
    }
}
