//! A WebSocket as a byte stream: binary messages in and out of `AsyncRead`/`AsyncWrite`.
