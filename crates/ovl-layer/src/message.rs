//! What a person reads of an error: the error and its causes on one line.
//!
//! Owns the other half of the rule every error type follows (an error says only its own part
//! and leaves its cause to `source()`): whoever prints an error prints its whole chain, so each
//! cause is said once. Names and other bytes from archives are escaped by
//! [`crate::path::display_bytes`] before they are put in an error.

/// An error and its causes, `: `-separated, as anyhow's `{:#}` shows them.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("reading the upper")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn each_cause_once_in_order() {
        let e = Outer(std::io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(
            super::error_chain(&e),
            "reading the upper: No such file or directory (os error 2)"
        );
    }
}
