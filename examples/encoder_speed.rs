//! Quick CPU timing of one training step per encoder/input size (not a benchmark of record).
use devise::model::{Config, DeviseModel, Encoder};
use tch::{nn::OptimizerConfig, Device, Kind, Tensor};

fn main() {
    tch::set_num_threads(2);
    let cases: Vec<(Encoder, Vec<i64>, i64)> = vec![
        (Encoder::Convnet, vec![32, 64, 128], 32),
        (Encoder::Convnet, vec![32, 64, 128, 256], 56),
        (Encoder::Convnet, vec![32, 64, 128, 256], 64),
        (Encoder::Resnet18, vec![], 56),
        (Encoder::Resnet18, vec![], 64),
    ];
    for (enc, widths, size) in cases {
        let cfg = Config {
            encoder: enc,
            widths: if widths.is_empty() {
                vec![1]
            } else {
                widths.clone()
            },
            projection_bias: false,
            norm: Default::default(),
            precision: Default::default(),
            channels_last: false,
        };
        let m = DeviseModel::new(&cfg, 30, 300, Device::Cpu).unwrap();
        let mut opt = tch::nn::Sgd::default().build(&m.vs, 0.01).unwrap();
        let x = Tensor::randn([64, 3, size, size], (Kind::Float, Device::Cpu));
        let y = Tensor::zeros([64], (Kind::Int64, Device::Cpu));
        let mut times = vec![];
        for _ in 0..6 {
            let t = std::time::Instant::now();
            let loss = m.logits(&m.features(&x, true)).cross_entropy_for_logits(&y);
            opt.backward_step(&loss);
            times.push(t.elapsed().as_secs_f64());
        }
        let fwd = std::time::Instant::now();
        let _features = tch::no_grad(|| m.features(&x, false));
        let f = fwd.elapsed().as_secs_f64();
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!(
            "{enc:?} {widths:?} {size}px: train {:.0} img/s, frozen fwd {:.0} img/s",
            64.0 / times[2],
            64.0 / f
        );
    }
}
