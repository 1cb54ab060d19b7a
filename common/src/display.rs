//! How times are written for people (the CLI, alert digests).

/// "3m 05s", "2h 10m", "12s".
pub fn human_age(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {:02}h", s / 86400, (s % 86400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::human_age;

    #[test]
    fn ages_read_like_people_write_them() {
        assert_eq!(human_age(5), "5s");
        assert_eq!(human_age(185), "3m 05s");
        assert_eq!(human_age(7800), "2h 10m");
        assert_eq!(human_age(90000), "1d 01h");
        assert_eq!(human_age(-3), "0s");
    }
}
