//! `immortal rm`: deletes a stream, named by its id or any unique prefix of it.

use clap::Args;

use super::common::ClientArgs;
use super::CliError;
use crate::client::ClientError;

/// Delete a stream: its local connection is closed, and its client told the stream is closed
/// (`immortal connect` then exits 4, as for a stream that is gone).
///
/// ID is the stream's id or any prefix of it that no other stream's id starts with (an
/// ambiguous prefix is refused, naming the streams it matches). Exits 4 if no stream matches.
///
/// Example: immortal rm 3f2a
#[derive(Debug, Clone, Args)]
pub struct RmArgs {
    /// Where the agent is and how to reach it.
    #[command(flatten)]
    pub client: ClientArgs,
    /// The stream's id, or a unique prefix of it (see `immortal ls`).
    pub id: String,
}

/// Deletes the stream.
pub async fn run(args: RmArgs) -> Result<(), CliError> {
    let api = args.client.api_client()?;
    let ids: Vec<String> = api
        .list()
        .await?
        .streams
        .into_iter()
        .map(|s| s.id)
        .collect();
    let id = resolve_prefix(&args.id, &ids)?;
    match api.delete(&id).await {
        Ok(()) => {
            println!("removed stream {id}");
            Ok(())
        }
        Err(ClientError::NotFound(_)) => Err(CliError::StreamGone(format!(
            "no stream {id} on the agent (removed or expired meanwhile)"
        ))),
        Err(err) => Err(err.into()),
    }
}

/// The one id among `ids` that is `prefix` or starts with it.
fn resolve_prefix(prefix: &str, ids: &[String]) -> Result<String, CliError> {
    if prefix.is_empty() {
        return Err(CliError::Other(
            "give a stream id (see `immortal ls`)".into(),
        ));
    }
    if let Some(exact) = ids.iter().find(|id| *id == prefix) {
        return Ok(exact.clone());
    }
    let matches: Vec<&String> = ids.iter().filter(|id| id.starts_with(prefix)).collect();
    match matches.as_slice() {
        [] => Err(CliError::StreamGone(format!(
            "no stream on the agent has an id starting with {prefix:?} (never created, already \
             removed, or expired)"
        ))),
        [one] => Ok((*one).clone()),
        many => Err(CliError::Other(format!(
            "{prefix:?} is ambiguous: {} streams match ({}); give more of the id",
            many.len(),
            many.iter()
                .map(|id| id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_unique_prefix_names_its_stream_and_an_ambiguous_one_is_refused() {
        let ids = vec!["3f2a01".to_owned(), "3f2b02".to_owned(), "9c".to_owned()];
        assert_eq!(resolve_prefix("3f2a", &ids).unwrap(), "3f2a01");
        assert_eq!(resolve_prefix("9", &ids).unwrap(), "9c");
        assert_eq!(resolve_prefix("3f2b02", &ids).unwrap(), "3f2b02");
        let ambiguous = resolve_prefix("3f", &ids).unwrap_err();
        assert!(matches!(&ambiguous, CliError::Other(m) if m.contains("ambiguous")));
        assert!(matches!(
            resolve_prefix("77", &ids),
            Err(CliError::StreamGone(_))
        ));
        assert!(resolve_prefix("", &ids).is_err());
    }
}
