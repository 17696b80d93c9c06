//! `meshctl node token create|list|delete`: the bootstrap tokens nodes
//! join with.

use crate::{
    NodeCommand, TokenCommand,
    client::Client,
    output::{align, show},
};

pub fn run(client: &Client, command: NodeCommand) -> anyhow::Result<()> {
    let NodeCommand::Token { command } = command;
    match command {
        TokenCommand::Create {
            node,
            ttl,
            description,
        } => {
            let answer = client.post_json(
                "/api/v1/nodes/tokens",
                &serde_json::json!({
                    "node": node,
                    "ttl_seconds": ttl.as_secs(),
                    "description": description.unwrap_or_default(),
                }),
            )?;
            let text = |k: &str| answer[k].as_str().unwrap_or("?").to_owned();
            // The token alone on stdout, for `$(meshctl node token create)`.
            println!("{}", text("token"));
            let scope = match answer["node"].as_str() {
                Some(node) => format!("node {node} only"),
                None => "any node".to_owned(),
            };
            eprintln!(
                "bootstrap token {} for {scope}, valid until {}; it is shown only this once",
                text("id"),
                text("expires_at")
            );
            Ok(())
        }
        TokenCommand::List { output } => {
            let answer = client.get_json("/api/v1/nodes/tokens", &[])?;
            let items = answer.as_array().cloned().unwrap_or_default();
            show(&answer, output, || {
                if items.is_empty() {
                    return Ok("No bootstrap tokens.\n".into());
                }
                let mut rows = vec![
                    ["ID", "NODE", "EXPIRES", "DESCRIPTION"]
                        .map(str::to_owned)
                        .to_vec(),
                ];
                for item in &items {
                    let text = |k: &str| item[k].as_str().unwrap_or("-").to_owned();
                    rows.push(vec![
                        text("id"),
                        item["node"].as_str().unwrap_or("<any>").to_owned(),
                        text("expires_at"),
                        text("description"),
                    ]);
                }
                Ok(align(&rows))
            })
        }
        TokenCommand::Delete { id } => {
            client.delete_empty(&format!("/api/v1/nodes/tokens/{id}"))?;
            println!("bootstrap token {id} revoked");
            Ok(())
        }
    }
}
