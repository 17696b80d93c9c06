//! `meshctl node token create|list|delete`: the bootstrap tokens nodes
//! join with.

use std::time::Duration;

use crate::{
    NodeCommand, TokenCommand,
    client::Client,
    output::{Format, align},
};

/// Parses `90s`, `30m`, `24h` or `7d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration like 90s, 30m, 24h or 7d");
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(bad()),
    };
    number
        .checked_mul(unit)
        .map(Duration::from_secs)
        .ok_or_else(bad)
}

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
            match output {
                Format::Json => println!("{}", serde_json::to_string_pretty(&answer)?),
                Format::Yaml => print!("{}", serde_yaml_ng::to_string(&answer)?),
                Format::Table if items.is_empty() => println!("No bootstrap tokens."),
                Format::Table => {
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
                    print!("{}", align(&rows));
                }
            }
            Ok(())
        }
        TokenCommand::Delete { id } => {
            client.delete_empty(&format!("/api/v1/nodes/tokens/{id}"))?;
            println!("bootstrap token {id} revoked");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
        for bad in ["", "h", "24", "1.5h", "-1h", "3w", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
