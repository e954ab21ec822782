//! Tables for people, times in UTC or relative to now.

use std::time::{SystemTime, UNIX_EPOCH};

/// Prints rows under a header, columns padded to their widest cell.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        let last = cells.len().saturating_sub(1);
        for (i, cell) in cells.into_iter().enumerate() {
            if i == last {
                out.push_str(&cell);
            } else {
                let pad = widths[i] - cell.chars().count();
                out.push_str(&cell);
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        line(row.clone());
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// "12s ago", "3m ago", "5h ago", "2d ago"; "never" for 0.
pub fn ago(ms: i64, now_ms: i64) -> String {
    if ms <= 0 {
        return "never".to_owned();
    }
    let secs = (now_ms - ms).max(0) / 1000;
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86_399 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

/// `2026-11-23T13:10:44Z` (UTC, second precision); "-" for 0 (never).
pub fn rfc3339(ms: i64) -> String {
    if ms <= 0 {
        return "-".to_owned();
    }
    let since_epoch = std::time::Duration::from_millis(ms.unsigned_abs());
    humantime::format_rfc3339_seconds(UNIX_EPOCH + since_epoch).to_string()
}

pub fn join_or_dash(items: &[String]) -> String {
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join(",")
    }
}

pub fn or_dash(text: &str) -> String {
    if text.is_empty() {
        "-".to_owned()
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_render() {
        assert_eq!(rfc3339(1_795_439_444_999), "2026-11-23T13:10:44Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(0), "-");
        assert_eq!(ago(0, 5), "never");
        assert_eq!(ago(1000, 13_000), "12s ago");
        assert_eq!(ago(1000, 1000 + 3 * 60_000), "3m ago");
        assert_eq!(ago(1000, 1000 + 2 * 86_400_000), "2d ago");
    }
}
