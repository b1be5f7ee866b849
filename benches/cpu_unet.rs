//! CPU UNet forward (and forward + input VJP) at batch 1 for both configs, so changes to the CPU
//! reference are measured. The CPU path is the spec, not the product: this guards against
//! accidental slowdowns, it is not the engine's speed claim (that comes from the GPU benchmark).
use criterion::{criterion_group, criterion_main, Criterion};
use purifier::backend::cpu::CpuBackend;
use purifier::backend::Backend;
use purifier::model::params::DeterministicParams;
use purifier::model::{Unet, UnetConfig};

fn unet_forward(c: &mut Criterion) {
    let b = CpuBackend;
    let mut group = c.benchmark_group("cpu_unet_batch1");
    group.sample_size(10);
    for config in [UnetConfig::cifar10_small(), UnetConfig::cifar10()] {
        let unet = Unet::load(&config, &mut DeterministicParams::new(&b, 1)).unwrap();
        let mut plan = unet.plan(&b, 1, true).unwrap();
        let x: Vec<f32> = (0..3072).map(|i| ((i * 37 % 255) as f32 / 127.5) - 1.0).collect();
        let x = b.upload(&x, &[1, 3, 32, 32]).unwrap();
        let v = b.upload(&vec![1.0; 3072], &[1, 3, 32, 32]).unwrap();
        group.bench_function(format!("{}/forward", config.name), |bench| {
            bench.iter(|| unet.forward(&b, &mut plan, &x, &[50.0]).unwrap().data[0])
        });
        group.bench_function(format!("{}/forward+vjp", config.name), |bench| {
            bench.iter(|| {
                unet.forward(&b, &mut plan, &x, &[50.0]).unwrap();
                unet.input_vjp(&b, &mut plan, &v).unwrap().data[0]
            })
        });
    }
    group.finish();
}

criterion_group!(benches, unet_forward);
criterion_main!(benches);
