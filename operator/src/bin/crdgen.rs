//! Writes the CRDs generated from the Rust types into a folder (default `crds/`).

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "crds".to_owned());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {dir}"))?;
    for (name, yaml) in atomic_operator::api::crd_files()? {
        let path = format!("{dir}/{name}");
        std::fs::write(&path, yaml).with_context(|| format!("writing {path}"))?;
        println!("wrote {path}");
    }
    Ok(())
}
