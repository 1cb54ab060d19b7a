//! MongoDB test databases: the URI of a database of the test's own on the server under test.

/// `uri` with its database (the path) replaced by `database`, keeping hosts and options. When
/// the URI has credentials but no `authSource`, the old database (or `admin`) stays the one
/// authenticated against. For tests and tools that need a database of their own.
pub fn with_database(uri: &str, database: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_owned();
    };
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let (authority, old_db) = match before_query.split_once('/') {
        Some((a, p)) => (a, p),
        None => (before_query, ""),
    };
    let mut options: Vec<String> = query
        .filter(|q| !q.is_empty())
        .map(|q| q.split('&').map(str::to_owned).collect())
        .unwrap_or_default();
    let has_auth_source = options
        .iter()
        .any(|o| o.to_ascii_lowercase().starts_with("authsource="));
    if authority.contains('@') && !has_auth_source {
        let auth_db = if old_db.is_empty() { "admin" } else { old_db };
        options.push(format!("authSource={auth_db}"));
    }
    let mut out = format!("{scheme}://{authority}/{database}");
    if !options.is_empty() {
        out.push('?');
        out.push_str(&options.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_get_another_database() {
        for (uri, want) in [
            ("mongodb://h:1", "mongodb://h:1/x"),
            ("mongodb://h:1/", "mongodb://h:1/x"),
            (
                "mongodb://h1,h2/old?replicaSet=rs0",
                "mongodb://h1,h2/x?replicaSet=rs0",
            ),
            ("mongodb://h?a=b", "mongodb://h/x?a=b"),
            ("mongodb://u:p@h/old", "mongodb://u:p@h/x?authSource=old"),
            (
                "mongodb+srv://u:p@c.example.net",
                "mongodb+srv://u:p@c.example.net/x?authSource=admin",
            ),
            (
                "mongodb://u:p@h/old?authSource=admin&w=1",
                "mongodb://u:p@h/x?authSource=admin&w=1",
            ),
        ] {
            assert_eq!(with_database(uri, "x"), want, "{uri}");
        }
    }
}
