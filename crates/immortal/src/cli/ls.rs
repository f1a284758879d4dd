//! `immortal ls`: lists the agent's streams, as a table or as the API's JSON.

use std::time::{Duration, SystemTime};

use clap::Args;

use super::common::ClientArgs;
use super::CliError;
use crate::api::{StreamInfo, StreamList};

/// List the agent's streams.
///
/// The table shows each stream's id, name, target port, whether a client is attached, the
/// bytes carried (IN: from the service to clients; OUT: from clients to the service) and when
/// a client was last seen. `--json` prints the API's answer unchanged, one JSON document.
///
/// Example: immortal ls --server myhost:7400 --json
#[derive(Debug, Clone, Args)]
pub struct LsArgs {
    /// Where the agent is and how to reach it.
    #[command(flatten)]
    pub client: ClientArgs,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Prints the streams.
pub async fn run(args: LsArgs) -> Result<(), CliError> {
    let api = args.client.api_client()?;
    let list = api.list().await?;
    if args.json {
        let text = serde_json::to_string_pretty(&list)
            .map_err(|err| CliError::Other(format!("cannot print JSON: {err}")))?;
        println!("{text}");
    } else {
        print!("{}", table(&list, SystemTime::now()));
    }
    Ok(())
}

/// The streams as a table with a header line, or a line saying there are none.
fn table(list: &StreamList, now: SystemTime) -> String {
    if list.streams.is_empty() {
        return "no streams\n".into();
    }
    let header = ["ID", "NAME", "PORT", "CONNECTED", "IN", "OUT", "LAST SEEN"].map(String::from);
    let rows: Vec<[String; 7]> = list.streams.iter().map(|s| row(s, now)).collect();
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for line in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = line
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn row(stream: &StreamInfo, now: SystemTime) -> [String; 7] {
    let last_seen = if stream.connected {
        "now".to_owned()
    } else {
        match stream
            .last_disconnected_at
            .as_deref()
            .or(stream.last_connected_at.as_deref())
        {
            Some(when) => ago(when, now),
            None => "never".to_owned(),
        }
    };
    [
        stream.id.clone(),
        stream.name.clone(),
        stream.port.to_string(),
        if stream.connected { "yes" } else { "no" }.to_owned(),
        bytes(stream.bytes_from_service),
        bytes(stream.bytes_to_service),
        last_seen,
    ]
}

/// "3m 20s ago" for an RFC 3339 time (the time itself if it does not parse).
fn ago(rfc3339: &str, now: SystemTime) -> String {
    let Ok(then) = humantime::parse_rfc3339_weak(rfc3339) else {
        return rfc3339.to_owned();
    };
    let elapsed = now.duration_since(then).unwrap_or(Duration::ZERO);
    // Whole seconds, and at most two units: "2h 5m", not "2h 5m 13s 120ms".
    let elapsed = Duration::from_secs(elapsed.as_secs());
    let text = humantime::format_duration(elapsed).to_string();
    let short: Vec<&str> = text.split(' ').take(2).collect();
    format!("{} ago", short.join(" "))
}

/// A byte count for people, in binary units.
fn bytes(count: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = count as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{count} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(id: &str, connected: bool, disconnected_at: Option<&str>) -> StreamInfo {
        StreamInfo {
            id: id.into(),
            name: "ssh".into(),
            port: 22,
            created_at: "2026-01-01T00:00:00Z".into(),
            last_connected_at: Some("2026-01-01T00:00:00Z".into()),
            last_disconnected_at: disconnected_at.map(Into::into),
            connected,
            bytes_to_service: 1536,
            bytes_from_service: 3 << 20,
            attach_key: None,
        }
    }

    #[test]
    fn an_empty_list_says_so() {
        let list = StreamList { streams: vec![] };
        assert_eq!(table(&list, SystemTime::now()), "no streams\n");
    }

    #[test]
    fn rows_line_up_under_the_header() {
        let now = humantime::parse_rfc3339("2026-01-01T00:03:20Z").unwrap();
        let list = StreamList {
            streams: vec![
                stream("aaaa", true, None),
                stream("bbbbbbbb", false, Some("2026-01-01T00:00:00Z")),
            ],
        };
        let text = table(&list, now);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("ID        NAME  PORT  CONNECTED  IN"));
        assert!(lines[1].contains("yes") && lines[1].ends_with("now"));
        assert!(lines[1].contains("3.0 MiB") && lines[1].contains("1.5 KiB"));
        assert!(lines[2].ends_with("3m 20s ago"), "{}", lines[2]);
    }

    #[test]
    fn byte_counts_read_well() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1024), "1.0 KiB");
        assert_eq!(bytes(5 << 30), "5.0 GiB");
    }
}
