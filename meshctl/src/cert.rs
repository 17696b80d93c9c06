//! `meshctl cert list|issue`.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::Path,
};

use anyhow::Context as _;

use crate::{
    CertCommand,
    client::Client,
    output::{align, show},
};

pub fn run(client: &Client, command: CertCommand) -> anyhow::Result<()> {
    match command {
        CertCommand::List {
            service,
            workload,
            output,
        } => {
            // A workload's certificates are recorded under `namespace/name`.
            let record = service.or(workload);
            let query: Vec<(&str, &str)> = record
                .iter()
                .map(|s| ("service_name", s.as_str()))
                .collect();
            let answer = client.get_json("/api/v1/certificates", &query)?;
            let items = answer["items"].as_array().cloned().unwrap_or_default();
            show(&answer, output, || {
                if items.is_empty() {
                    return Ok("No certificates issued.\n".into());
                }
                let mut rows = vec![
                    [
                        "SERVICE",
                        "SPIFFE-ID",
                        "SERIAL",
                        "NOT-AFTER",
                        "STATE",
                        "KEY",
                        "NODE",
                    ]
                    .map(str::to_owned)
                    .to_vec(),
                ];
                for item in &items {
                    let text = |k: &str| item[k].as_str().unwrap_or("-").to_owned();
                    rows.push(vec![
                        text("service_name"),
                        text("spiffe_id"),
                        text("serial"),
                        text("not_after"),
                        text("state"),
                        text("key"),
                        text("node"),
                    ]);
                }
                Ok(align(&rows))
            })
        }
        CertCommand::Issue {
            namespace,
            service_account,
            service,
            out_dir,
        } => {
            let answer = client.post_json(
                "/api/v1/certificates",
                &serde_json::json!({
                    "namespace": namespace,
                    "service_account": service_account,
                    "service_name": service,
                }),
            )?;
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&out_dir)
                .with_context(|| format!("creating {}", out_dir.display()))?;
            let field = |k: &str| {
                answer[k]
                    .as_str()
                    .map(str::to_owned)
                    .with_context(|| format!("the answer has no {k}"))
            };
            write(&out_dir.join("cert.pem"), &field("cert_pem")?, 0o644)?;
            write(&out_dir.join("key.pem"), &field("key_pem")?, 0o600)?;
            write(
                &out_dir.join("bundle.pem"),
                &field("trust_bundle_pem")?,
                0o644,
            )?;
            println!(
                "issued {} (serial {}, valid until {})\nwrote cert.pem, key.pem (0600) and bundle.pem to {}",
                field("spiffe_id")?,
                field("serial")?,
                field("not_after")?,
                out_dir.display()
            );
            Ok(())
        }
    }
}

fn write(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}
