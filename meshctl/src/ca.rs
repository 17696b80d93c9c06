//! `meshctl ca status|rotate-root|retire-root`: the mesh's roots and their
//! make-before-break rotation.

use crate::{
    CaCommand,
    client::Client,
    output::{Format, align, show},
};

fn print_status(answer: &serde_json::Value, output: Format) -> anyhow::Result<()> {
    show(answer, output, || {
        let heading = format!(
            "trust domain {}, certificates live {} s\n",
            answer["trust_domain"].as_str().unwrap_or("?"),
            answer["certificate_ttl_seconds"]
        );
        let mut rows = vec![
            ["SERIAL", "STATE", "NOT-BEFORE", "NOT-AFTER"]
                .map(str::to_owned)
                .to_vec(),
        ];
        for root in answer["roots"].as_array().into_iter().flatten() {
            let text = |k: &str| root[k].as_str().unwrap_or("-").to_owned();
            rows.push(vec![
                text("serial"),
                text("state"),
                text("not_before"),
                text("not_after"),
            ]);
        }
        Ok(heading + &align(&rows))
    })
}

pub fn run(client: &Client, command: CaCommand) -> anyhow::Result<()> {
    match command {
        CaCommand::Status { output } => print_status(&client.get_json("/api/v1/ca", &[])?, output),
        CaCommand::RotateRoot { activate, force } => {
            let answer = client.post_json(
                "/api/v1/ca/rotate-root",
                &serde_json::json!({ "activate": activate, "force": force }),
            )?;
            if activate {
                println!(
                    "the staged root signs from now on; the old root stays trusted. \
                     Once the certificates it signed have expired, retire it with \
                     `meshctl ca retire-root <serial>`."
                );
            } else {
                println!(
                    "a new root is staged: trusted by every node from its next certificate, \
                     not yet signing. After one certificate lifetime, make it sign with \
                     `meshctl ca rotate-root --activate`."
                );
            }
            print_status(&answer, Format::Table)
        }
        CaCommand::RetireRoot { serial, force } => {
            let answer = client.post_json(
                "/api/v1/ca/retire-root",
                &serde_json::json!({ "serial": serial, "force": force }),
            )?;
            println!("root {serial} retired: it is no longer in the trust bundle");
            print_status(&answer, Format::Table)
        }
    }
}
