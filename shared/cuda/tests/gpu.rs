//! Checks that need an NVIDIA GPU. They are ignored by default (CI machines have none); on a GPU
//! machine run `cargo test -p tandem-cuda --release -- --ignored`. They fail, never skip, when
//! what they need is missing. The same checks run from `tandem bench gpu-check`.

use tandem_cuda::checks;

fn gpu() -> tandem_cuda::Gpu {
    tandem_cuda::Gpu::open(0).expect("these tests need a CUDA GPU (device 0)")
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn attention_kernels_match_a_float64_reference() {
    let gpu = gpu();
    for (i, case) in checks::attention_cases().iter().enumerate() {
        let c = checks::attention_case(&gpu, case, 100 + i as u64).expect("attention case runs");
        assert!(c.passed, "{}: relative error {:?} over {:?}", c.name, c.rel_err, c.tolerance);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn device_sampling_follows_its_distribution() {
    for c in checks::sampling(&gpu()).expect("sampling runs") {
        assert!(c.passed, "{}: {}", c.name, c.detail);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU and TANDEM_GPU_REFERENCE (a folder from scripts/gpu/reference.py)"]
fn model_logits_match_transformers_in_float64() {
    let dir = std::env::var("TANDEM_GPU_REFERENCE").expect("set TANDEM_GPU_REFERENCE to the output of scripts/gpu/reference.py");
    let checks = checks::reference_models(std::path::Path::new(&dir), 0, 1, tandem_cuda::WeightFormat::Bf16).expect("reference models run");
    assert!(checks.len() >= 3);
    for c in checks {
        assert!(c.passed, "{}: {:?} ({})", c.name, c.rel_err, c.detail);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU and TANDEM_MODEL (the default GGUF)"]
fn greedy_tokens_match_the_cpu_engine() {
    let model = std::env::var("TANDEM_MODEL").expect("set TANDEM_MODEL to a GGUF file");
    let prompts = ["def fibonacci(n):", "Once upon a time, in a small village,"];
    for c in checks::greedy_vs_cpu(&model, &prompts, 8, 4, 0).expect("both engines run") {
        assert!(c.passed, "{}: {}", c.name, c.detail);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn fp8_weights_match_the_host_rounding_and_a_float64_product() {
    for c in checks::fp8(&gpu()).expect("fp8 checks run") {
        assert!(c.passed, "{}: {:?} ({})", c.name, c.rel_err, c.detail);
    }
}
