//! The agent's bearer token: where it lives, generating it, checking it.
