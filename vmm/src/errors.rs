//! The one place an error chain becomes text: the edges (the CLI's `error:` line, a
//! log line, HTTP's reason list) call these; everything below keeps the error itself.

/// `A: B: C` for an error and its sources. Some library errors already print their source
/// in their own message; such a repeated tail is not printed twice.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    chain_parts(error).join(": ")
}

/// The messages of an error and its sources, outermost first, without the tails a
/// message already repeats (HTTP sends them as a list).
pub fn chain_parts(error: &dyn std::error::Error) -> Vec<String> {
    let mut parts = vec![error.to_string()];
    let mut text = parts[0].clone();
    let mut source = error.source();
    while let Some(e) = source {
        let part = e.to_string();
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
            parts.push(part);
        }
        source = e.source();
    }
    parts
}

/// An error that crosses threads with its chain: a worker's failure reaches the control
/// loop, and the API's answer, as the error it was, not as a flattened string.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The same, for an error several threads read (the first failure of a pool of
/// connections, reported by whichever thread asks).
pub type SharedError = std::sync::Arc<dyn std::error::Error + Send + Sync + 'static>;

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Middle);
    #[derive(Debug, thiserror::Error)]
    #[error("middle: inner")]
    struct Middle(#[source] Inner);
    #[derive(Debug, thiserror::Error)]
    #[error("inner")]
    struct Inner;

    #[test]
    fn chain_skips_repeated_tails() {
        assert_eq!(error_chain(&Outer(Middle(Inner))), "outer: middle: inner");
        assert_eq!(
            chain_parts(&Outer(Middle(Inner))),
            ["outer", "middle: inner"]
        );
    }
}
