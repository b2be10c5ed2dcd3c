//! The DeViSE model (paper §3): an image encoder `v(image)`, a softmax head used for the
//! pretraining stage (the paper's softmax baseline), and the linear projection `M` into the word
//! space. The model holds architecture only: it never knows its rank (data
//! parallelism lives in `collective`).
//!
//! Parameter names follow torchvision under three prefixes, so PyTorch users recognise them in the
//! safetensors checkpoint: `encoder.conv1.weight`, `encoder.layer1.0.bn1.running_mean`, ...,
//! `classifier.weight` `[num_classes, feature_dim]`, `projection.weight` `[embed_dim, feature_dim]`.
pub mod gpu;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::nn::{self, ModuleT};
use tch::{Device, Tensor};

/// Which image encoder to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Encoder {
    /// ResNet-18 from `tch::vision::resnet` (512-d features).
    Resnet18,
    /// ResNet-34 from `tch::vision::resnet` (512-d features).
    Resnet34,
    /// ResNet-50 from `tch::vision::resnet` (2048-d features).
    Resnet50,
    /// A small VGG-style CNN for CPU budgets: a stride-2 3x3 stem, then one stage per entry of
    /// `widths` (two 3x3 conv-BN-ReLU, 2x2 max-pool between stages), global average pool.
    /// Feature dimension = the last width.
    Convnet,
}

deserialize_by_name!(Encoder);

/// `[model]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Image encoder architecture.
    pub encoder: Encoder,
    /// Channel widths of the `convnet` stages (ignored by the ResNets).
    #[serde(default = "default_widths")]
    pub widths: Vec<i64>,
    /// Give the projection a bias: `M v + b`. The paper's map is linear (`M v`, §3); a bias adds
    /// the same vector to every image embedding, which favours the labels aligned with it.
    #[serde(default = "default_true")]
    pub projection_bias: bool,
    /// Normalisation layers of the `convnet` encoder. `batch` (default): BatchNorm, whose
    /// training-mode statistics are computed per rank (so a data-parallel run is not exactly the
    /// single-process run with the global batch). `group`: GroupNorm (8 groups), which has no
    /// batch statistics: a run on any number of ranks computes the same function. The ResNets
    /// always use BatchNorm.
    #[serde(default)]
    pub norm: Norm,
    /// Arithmetic of the encoder's forward pass: `fp32` (default) or `bf16` (bfloat16 autocast;
    /// float32 weights, gradients, optimizer state, heads and loss; `crate::model::gpu`). Meant for
    /// CUDA; it also runs on the CPU (oneDNN), slowly without AVX512-BF16.
    #[serde(default)]
    pub precision: crate::model::gpu::Precision,
    /// Lay out convolution weights and input batches channels-last (NHWC), what cuDNN's
    /// tensor-core kernels want (PyTorch's `channels_last`). Same values; default `false`.
    #[serde(default)]
    pub channels_last: bool,
}

/// Normalisation layers of the `convnet` encoder.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Norm {
    /// BatchNorm (running statistics, `encoder.*.bn.*`).
    #[default]
    Batch,
    /// GroupNorm with 8 groups (1 if the width is not a multiple of 8), `encoder.*.gn.*`.
    Group,
}

deserialize_by_name!(Norm);

/// A training stage (paper §3.3 recipe). Spelt `softmax`, `devise`, `finetune` in TOML, in
/// checkpoints (`train_state.json`), in evaluation files and on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum StageKind {
    /// Encoder + softmax head, cross-entropy: the pretraining and the softmax baseline.
    Softmax,
    /// Projection only, encoder frozen (eval-mode BatchNorm, no gradient), hinge rank loss.
    Devise,
    /// Encoder + projection, hinge rank loss.
    Finetune,
}

deserialize_by_name!(StageKind);

impl StageKind {
    /// Every stage, in training order.
    pub const ALL: [StageKind; 3] = [StageKind::Softmax, StageKind::Devise, StageKind::Finetune];

    /// `softmax`, `devise`, `finetune`.
    pub fn name(self) -> &'static str {
        match self {
            StageKind::Softmax => "softmax",
            StageKind::Devise => "devise",
            StageKind::Finetune => "finetune",
        }
    }
}

impl std::fmt::Display for StageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

fn default_true() -> bool {
    true
}

fn default_widths() -> Vec<i64> {
    vec![32, 64, 128, 256]
}

impl Config {
    /// Checks the section; errors name the key.
    pub fn validate(&self) -> Result<()> {
        if self.encoder == Encoder::Convnet
            && (self.widths.is_empty() || self.widths.iter().any(|&w| w <= 0))
        {
            bail!("model.widths must be a non-empty list of positive channel counts");
        }
        if self.norm == Norm::Group && self.encoder != Encoder::Convnet {
            bail!("model.norm = \"group\" is only available for encoder = \"convnet\" (the ResNets use BatchNorm)");
        }
        Ok(())
    }

    /// Dimension of `v(image)`, the encoder's output.
    pub fn feature_dim(&self) -> i64 {
        match self.encoder {
            Encoder::Resnet18 | Encoder::Resnet34 => 512,
            Encoder::Resnet50 => 2048,
            Encoder::Convnet => *self.widths.last().unwrap_or(&0),
        }
    }
}

/// Encoder + softmax head + projection, all in one `VarStore` (so one checkpoint holds them).
pub struct DeviseModel {
    /// All variables, trainable and not (BatchNorm running statistics).
    pub vs: nn::VarStore,
    encoder: Box<dyn ModuleT>,
    classifier: nn::Linear,
    projection: nn::Linear,
    /// Dimension of the encoder output `v(image)`.
    pub feature_dim: i64,
    /// Dimension of the word space (the label vectors' dimension).
    pub embed_dim: i64,
    /// Number of softmax classes (the seen training labels).
    pub num_classes: i64,
    precision: crate::model::gpu::Precision,
    channels_last: bool,
    device: Device,
}

impl DeviseModel {
    /// Builds a freshly initialised model on `device`. Initialisation draws from libtorch's global
    /// generator: seed it first (`tch::manual_seed`) for reproducible weights. Errors: libtorch
    /// refuses `cfg.precision`'s autocast or the channels-last layout on `device`.
    pub fn new(
        cfg: &Config,
        num_classes: i64,
        embed_dim: i64,
        device: Device,
    ) -> anyhow::Result<DeviseModel> {
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let enc = &root / "encoder";
        let encoder: Box<dyn ModuleT> = match cfg.encoder {
            Encoder::Resnet18 => Box::new(tch::vision::resnet::resnet18_no_final_layer(&enc)),
            Encoder::Resnet34 => Box::new(tch::vision::resnet::resnet34_no_final_layer(&enc)),
            Encoder::Resnet50 => Box::new(tch::vision::resnet::resnet50_no_final_layer(&enc)),
            Encoder::Convnet => Box::new(convnet(&enc, &cfg.widths, cfg.norm)),
        };
        let feature_dim = cfg.feature_dim();
        let classifier = nn::linear(
            &root / "classifier",
            feature_dim,
            num_classes,
            Default::default(),
        );
        // The projection starts small so initial image embeddings are near the origin and the
        // hinge terms all start active (every margin violated), as in a fresh DeViSE layer.
        let projection = nn::linear(
            &root / "projection",
            feature_dim,
            embed_dim,
            nn::LinearConfig {
                ws_init: nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.01 / (feature_dim as f64).sqrt(),
                },
                bs_init: Some(nn::Init::Const(0.0)),
                bias: cfg.projection_bias,
            },
        );
        if cfg.channels_last {
            crate::model::gpu::to_channels_last(&vs)?;
        }
        // Fails here, not in the middle of a forward pass, if autocast cannot be set.
        crate::model::gpu::autocast(cfg.precision, device, || ())?;
        Ok(DeviseModel {
            vs,
            encoder,
            classifier,
            projection,
            feature_dim,
            embed_dim,
            num_classes,
            precision: cfg.precision,
            channels_last: cfg.channels_last,
            device,
        })
    }

    /// `v(image)`: images `[batch, 3, H, W]` (normalised float) -> features `[batch, feature_dim]`.
    /// `train` selects BatchNorm's batch statistics (and updates the running ones).
    /// With `precision = bf16` the encoder runs under bfloat16 autocast and the features come
    /// back as float32; with `channels_last` a 4-d batch is laid out NHWC first.
    pub fn features(&self, images: &Tensor, train: bool) -> Tensor {
        use crate::model::gpu::{self, Precision};
        // Layout only (same values): if libtorch refused it, NCHW computes the same features.
        let nhwc = (self.channels_last && images.dim() == 4)
            .then(|| gpu::channels_last(images).ok())
            .flatten();
        let images = nhwc.as_ref().unwrap_or(images);
        match self.precision {
            Precision::Fp32 => self.encoder.forward_t(images, train),
            // `new` checked that autocast can be set on this device.
            Precision::Bf16 => gpu::autocast(Precision::Bf16, self.device, || {
                self.encoder.forward_t(images, train)
            })
            .unwrap_or_else(|_| self.encoder.forward_t(images, train))
            .to_kind(tch::Kind::Float),
        }
    }

    /// Softmax logits `[batch, num_classes]` from features `[batch, feature_dim]`.
    pub fn logits(&self, features: &Tensor) -> Tensor {
        features.apply(&self.classifier)
    }

    /// `image_embedding = M v(image)`: `[batch, embed_dim]` from features `[batch, feature_dim]`.
    /// Not normalised: the paper scores a label by the dot product `t_label · M v` (§3.3).
    pub fn image_embedding(&self, features: &Tensor) -> Tensor {
        features.apply(&self.projection)
    }

    /// Named trainable parameters whose name starts with one of `prefixes` (e.g. `"encoder."`),
    /// sorted by name so every rank and every resume sees the same order.
    pub fn parameters(&self, prefixes: &[&str]) -> Vec<(String, Tensor)> {
        let mut named: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .filter(|(name, t)| t.requires_grad() && prefixes.iter().any(|p| name.starts_with(p)))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named
    }

    /// Indices into `params` (parameters of this model) in the order the model created them:
    /// the order of the forward pass, which backward reverses. Tensors are matched by identity
    /// (their storage); any not found keep their relative order at the end.
    pub fn creation_order(&self, params: &[Tensor]) -> Vec<usize> {
        let rank: std::collections::HashMap<usize, usize> = self
            .vs
            .trainable_variables()
            .iter()
            .enumerate()
            .map(|(i, t)| (t.data_ptr() as usize, i))
            .collect();
        let mut order: Vec<usize> = (0..params.len()).collect();
        order.sort_by_key(|&i| {
            rank.get(&(params[i].data_ptr() as usize))
                .copied()
                .unwrap_or(usize::MAX)
        });
        order
    }

    /// Every variable (parameters and BatchNorm statistics), sorted by name: what a checkpoint holds.
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        let mut named: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named
    }

    /// Initialises the variables whose names start with one of `prefixes` from `tensors` (e.g.
    /// the encoder and classifier of a pretrained softmax stage); every such variable must be
    /// present with the same shape and dtype (errors name the first missing or mismatched one,
    /// with both shapes or dtypes). Other
    /// variables keep their values. Returns how many were copied.
    pub fn load_prefixes(
        &mut self,
        tensors: &[(String, Tensor)],
        prefixes: &[&str],
    ) -> Result<usize> {
        let by_name: std::collections::HashMap<&str, &Tensor> =
            tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut copied = 0;
        for (name, var) in self.vs.variables() {
            if !prefixes.iter().any(|p| name.starts_with(p)) {
                continue;
            }
            let Some(src) = by_name.get(name.as_str()) else {
                bail!("the weights have no tensor '{name}' (different model.encoder?)");
            };
            if src.size() != var.size() {
                bail!(
                    "tensor '{name}': shape {:?} in the weights, {:?} in this model (different model or seen classes?)",
                    src.size(),
                    var.size()
                );
            }
            if src.kind() != var.kind() {
                bail!(
                    "tensor '{name}': dtype {} in the weights, {} expected by this model",
                    crate::storage::tensors::dtype_name(src.kind()),
                    crate::storage::tensors::dtype_name(var.kind())
                );
            }
            tch::no_grad(|| var.shallow_clone().copy_(src));
            copied += 1;
        }
        Ok(copied)
    }

    /// Copies `tensors` into the variables of the same name: every variable must be present with
    /// the same shape and dtype, and every tensor must be a variable. Errors name the first offender.
    pub fn load_state_dict(&mut self, tensors: &[(String, Tensor)]) -> Result<()> {
        let vars = self.vs.variables();
        if let Some((extra, _)) = tensors.iter().find(|(n, _)| !vars.contains_key(n)) {
            bail!("checkpoint tensor '{extra}' is not a variable of this model (wrong model.encoder?)");
        }
        self.load_prefixes(tensors, &[""])?;
        Ok(())
    }
}

fn conv_bn(p: nn::Path, c_in: i64, c_out: i64, stride: i64, norm: Norm) -> impl ModuleT {
    let conv = nn::conv2d(
        &p / "conv",
        c_in,
        c_out,
        3,
        nn::ConvConfig {
            stride,
            padding: 1,
            bias: false,
            ..Default::default()
        },
    );
    let norm: Box<dyn ModuleT> = match norm {
        Norm::Batch => Box::new(nn::batch_norm2d(&p / "bn", c_out, Default::default())),
        Norm::Group => {
            let groups = if c_out % 8 == 0 { 8 } else { 1 };
            Box::new(nn::group_norm(&p / "gn", groups, c_out, Default::default()))
        }
    };
    nn::func_t(move |xs, train| norm.forward_t(&xs.apply(&conv), train).relu())
}

/// The small `convnet` encoder: stem (3x3, stride 2) then per stage two conv-BN-ReLU and a 2x2
/// max-pool (none after the last), global average pool -> `[batch, widths.last()]`.
fn convnet(p: &nn::Path, widths: &[i64], norm: Norm) -> impl ModuleT {
    let mut seq = nn::seq_t().add(conv_bn(p / "stem", 3, widths[0], 2, norm));
    let mut c_in = widths[0];
    for (i, &w) in widths.iter().enumerate() {
        let stage = p / format!("stage{i}");
        seq = seq
            .add(conv_bn(&stage / "0", c_in, w, 1, norm))
            .add(conv_bn(&stage / "1", w, w, 1, norm));
        if i + 1 < widths.len() {
            seq = seq.add_fn(|xs| xs.max_pool2d_default(2));
        }
        c_in = w;
    }
    seq.add_fn(|xs| xs.adaptive_avg_pool2d([1, 1]).flat_view())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_and_names() {
        tch::manual_seed(0);
        let cfg = Config {
            encoder: Encoder::Convnet,
            widths: vec![8, 16],
            projection_bias: true,
            norm: Norm::Batch,
            precision: Default::default(),
            channels_last: false,
        };
        let m = DeviseModel::new(&cfg, 5, 7, Device::Cpu).unwrap();
        let x = Tensor::randn([2, 3, 32, 32], (tch::Kind::Float, Device::Cpu));
        let f = m.features(&x, true);
        assert_eq!(f.size(), vec![2, 16]);
        assert_eq!(m.logits(&f).size(), vec![2, 5]);
        assert_eq!(m.image_embedding(&f).size(), vec![2, 7]);
        let names: Vec<String> = m.state_dict().into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"projection.weight".to_string()));
        assert!(names.contains(&"projection.bias".to_string()));
        assert!(names.contains(&"encoder.stem.bn.running_mean".to_string()));
        assert!(m
            .parameters(&["encoder."])
            .iter()
            .all(|(n, _)| n.starts_with("encoder.")));
    }

    #[test]
    fn weights_of_another_dtype_are_refused_naming_tensor_and_dtypes() {
        let cfg = Config {
            encoder: Encoder::Convnet,
            widths: vec![4],
            projection_bias: true,
            norm: Norm::Batch,
            precision: Default::default(),
            channels_last: false,
        };
        let mut m = DeviseModel::new(&cfg, 2, 3, Device::Cpu).unwrap();
        let same = m.state_dict();
        m.load_state_dict(&same).unwrap();
        let doubled: Vec<(String, Tensor)> = same
            .iter()
            .map(|(n, t)| {
                let t = if n == "projection.weight" {
                    t.to_kind(tch::Kind::Double)
                } else {
                    t.shallow_clone()
                };
                (n.clone(), t)
            })
            .collect();
        let err = m.load_state_dict(&doubled).unwrap_err().to_string();
        assert!(
            err.contains("'projection.weight'") && err.contains("dtype F64") && err.contains("F32"),
            "{err}"
        );
    }

    #[test]
    fn resnet18_feature_dim() {
        let cfg = Config {
            encoder: Encoder::Resnet18,
            widths: default_widths(),
            projection_bias: false,
            norm: Norm::Batch,
            precision: Default::default(),
            channels_last: false,
        };
        let m = DeviseModel::new(&cfg, 3, 4, Device::Cpu).unwrap();
        let x = Tensor::randn([1, 3, 64, 64], (tch::Kind::Float, Device::Cpu));
        assert_eq!(m.features(&x, false).size(), vec![1, 512]);
        assert!(!m.state_dict().iter().any(|(n, _)| n == "projection.bias"));
        assert!(m
            .state_dict()
            .iter()
            .any(|(n, _)| n == "encoder.layer1.0.conv1.weight"));
    }
}
