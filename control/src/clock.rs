//! Wall-clock time as Unix milliseconds (what the store and the contract
//! carry) and its RFC 3339 rendering for messages.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// `2026-11-23T13:10:44Z` for Unix milliseconds (UTC, second precision).
/// Instants before 1970 are shown as the epoch.
pub fn rfc3339(ms: i64) -> String {
    let since_epoch = Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(UNIX_EPOCH + since_epoch).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_439_444_999), "2026-11-23T13:10:44Z");
        assert_eq!(rfc3339(-1000), "1970-01-01T00:00:00Z");
    }
}
