//! Writes a model's tokenizer (from a `.gguf` file, a model folder or a hub id) as a
//! `tokenizer.json`, for pairing a GGUF model's vocabulary with other weights (the GPU
//! benchmarks build random-weight models around the default model's vocabulary this way).
//!
//!     cargo run -p tandem-tokenizer --example export_tokenizer -- MODEL OUT.json

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, out] = args.as_slice() else {
        anyhow::bail!("usage: export_tokenizer MODEL OUT.json");
    };
    let files = tandem_tokenizer::ModelFiles::resolve(model)?;
    let tokenizer = tandem_tokenizer::Tokenizer::load(&files)?;
    std::fs::write(out, tokenizer.to_json()?)?;
    println!("{out}: {} tokens", tokenizer.vocab_size());
    Ok(())
}
