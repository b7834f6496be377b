//! `--device`: the CUDA engine where a GPU is visible, and a clear refusal where none is (the
//! same binary serves both: the driver is loaded at run time).

mod common;

use common::tandem;

#[test]
fn generate_on_cuda_runs_on_a_gpu_and_says_why_not_elsewhere() {
    let out = tandem()
        .args(["generate", "--device", "cuda:0", "--raw", "--prompt", "The capital of France is", "--max-tokens", "4"])
        .output()
        .expect("tandem runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if tandem_cuda::device_count() == 0 {
        assert!(!out.status.success(), "no GPU here, yet generate succeeded");
        assert!(stderr.contains("cuda:0"), "the error names the device: {stderr}");
        assert!(!stderr.contains("panicked"), "a clean error, not a panic: {stderr}");
    } else {
        assert!(out.status.success(), "{stderr}");
        assert!(!out.stdout.is_empty(), "no text generated");
    }
}

#[test]
fn an_unknown_device_is_refused_with_the_accepted_forms() {
    let out = tandem().args(["generate", "--device", "tpu", "--prompt", "hi", "--max-tokens", "1"]).output().expect("tandem runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("expected cpu or cuda:N"), "{stderr}");
}
