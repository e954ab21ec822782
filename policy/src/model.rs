//! Validation of the names and numbers of the network model.

/// What is wrong with a name, port or selector, naming the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("{kind} name `{name}` is not a DNS label: {why}")]
    BadLabel {
        kind: &'static str,
        name: String,
        why: &'static str,
    },
    #[error("port {port} is out of range: ports are 1-65535")]
    BadPort { port: u64 },
    #[error("selector `{selector}` is not valid: {why}")]
    BadSelector { selector: String, why: &'static str },
}

/// Checks that `name` is a DNS label (RFC 1123): 1-63 characters of
/// lowercase letters, digits and `-`, not starting or ending with `-`.
/// `kind` names the thing in the error ("network", "alias").
pub fn validate_label(kind: &'static str, name: &str) -> Result<(), ModelError> {
    let bad = |why| {
        Err(ModelError::BadLabel {
            kind,
            name: name.to_owned(),
            why,
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > 63 {
        return bad("it is longer than 63 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return bad("only lowercase letters, digits and `-` are allowed");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return bad("it may not start or end with `-`");
    }
    Ok(())
}

/// Checks that a port is in 1-65535.
pub fn validate_port(port: u64) -> Result<u16, ModelError> {
    match u16::try_from(port) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(ModelError::BadPort { port }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        for ok in ["dev", "api-2", "a", &"x".repeat(63)] {
            validate_label("network", ok).unwrap();
        }
        for bad in ["", "Dev", "-a", "a-", "a.b", "a_b", &"x".repeat(64)] {
            let err = validate_label("network", bad).unwrap_err();
            assert!(err.to_string().starts_with("network name"), "{err}");
        }
    }

    #[test]
    fn ports() {
        assert_eq!(validate_port(8080).unwrap(), 8080);
        assert!(validate_port(0).is_err());
        assert_eq!(
            validate_port(70000).unwrap_err().to_string(),
            "port 70000 is out of range: ports are 1-65535"
        );
    }
}
