//! Errors a person can act on. Every library error of the workspace implements [`Hint`], and
//! an error's cause chain is said one way, by [`chain`] (or [`one_line`] where one line is all
//! there is room for). Only the binary prints: `error:`, one `caused by:` per cause, `hint:`.
//! (The model is uv's `uv-errors`.)

use std::error::Error;

/// An error that may know what the person can do about it.
pub trait Hint: Error {
    /// What the person can do about it, when there is something to say beyond the message.
    fn hint(&self) -> Option<String> {
        None
    }
}

/// The error's message, then each cause's, leaving out a cause whose text is already said
/// (HTTP and I/O wrappers often repeat their source in their own message).
pub fn chain(e: &dyn Error) -> Vec<String> {
    let mut said = vec![e.to_string()];
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !text.is_empty() && !said.iter().any(|s| s.contains(&text)) {
            said.push(text);
        }
        source = cause.source();
    }
    said
}

/// [`chain`] on one line, `: `-separated: for logs, JSON fields and stage failures.
pub fn one_line(e: &dyn Error) -> String {
    chain(e).join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl Error for Layer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.1.as_deref().map(|l| l as &(dyn Error + 'static))
        }
    }

    #[test]
    fn the_chain_says_each_cause_once() {
        let e = Layer(
            "cannot reach the remote: connection refused",
            Some(Box::new(Layer(
                "connection refused",
                Some(Box::new(Layer("os error 111", None))),
            ))),
        );
        assert_eq!(
            chain(&e),
            [
                "cannot reach the remote: connection refused",
                "os error 111"
            ]
        );
        assert_eq!(
            one_line(&e),
            "cannot reach the remote: connection refused: os error 111"
        );
    }
}
