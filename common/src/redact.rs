//! Connection strings as people may see them: in logs, in the failures stored on events (so in
//! `ticketing outbox` and in alerts), in `/readyz` and in errors at start. A password or a token
//! in a URL's user info goes to the server it is for and nowhere else.

/// `url` with the user info of every server redacted: `nats://alice:***@host:4222` (the user
/// stays, the password goes), `nats://***@host:4222` (a token alone). A comma-separated list of
/// servers is redacted server by server. The user info runs to the last `@` of a server, so a
/// password holding `@`, `/` or `:` is hidden whole; a `,` in a password must be
/// percent-encoded (`%2C`), as every NATS client expects anyway.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(redact_server)
        .collect::<Vec<_>>()
        .join(",")
}

fn redact_server(server: &str) -> String {
    let Some(at) = server.rfind('@') else {
        return server.to_owned();
    };
    // After `scheme://`, when the text before `://` is a scheme (and not part of a password).
    let start = server
        .find("://")
        .filter(|&i| {
            let scheme = server[..i].trim_start();
            scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        })
        .map_or(0, |i| i + 3);
    if at < start {
        return server.to_owned();
    }
    let shown = match server[start..at].split_once(':') {
        Some((user, _password)) => format!("{user}:***"),
        None => "***".to_owned(),
    };
    format!("{}{shown}{}", &server[..start], &server[at..])
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn a_password_is_hidden_and_its_user_kept() {
        assert_eq!(
            redact_url("nats://alice:s3cr3t@nats-srv:4222"),
            "nats://alice:***@nats-srv:4222"
        );
        assert_eq!(
            redact_url("nats://alice:@host:4222"),
            "nats://alice:***@host:4222"
        );
        assert_eq!(
            redact_url("redis://:s3cr3t@redis:6379/0"),
            "redis://:***@redis:6379/0"
        );
    }

    #[test]
    fn a_token_alone_is_hidden_whole() {
        assert_eq!(redact_url("nats://t0k3n@host"), "nats://***@host");
        assert_eq!(redact_url("t0k3n@127.0.0.1:4222"), "***@127.0.0.1:4222");
    }

    #[test]
    fn every_server_of_a_list_is_redacted() {
        assert_eq!(
            redact_url("nats://alice:pw1@a:4222,nats://bob:pw2@b:4222, nats://c:4222,tok@d"),
            "nats://alice:***@a:4222,nats://bob:***@b:4222, nats://c:4222,***@d"
        );
    }

    #[test]
    fn the_http_scheme_of_the_course_manifests_too() {
        assert_eq!(
            redact_url("http://alice:s3cr3t@nats-srv:4222"),
            "http://alice:***@nats-srv:4222"
        );
        assert_eq!(
            redact_url("https://t0k3n@nats-srv:4222/"),
            "https://***@nats-srv:4222/"
        );
    }

    #[test]
    fn passwords_holding_url_delimiters_are_hidden_whole() {
        for url in [
            "nats://alice:p@ss@host:4222",
            "nats://alice:pa/ss@host:4222",
            "nats://alice:pa:ss@host:4222",
            "nats://alice:pa%40ss@host:4222",
        ] {
            assert_eq!(redact_url(url), "nats://alice:***@host:4222", "{url}");
        }
        // `://` inside a password is not taken for the scheme's.
        assert_eq!(redact_url("alice:x://y@host"), "alice:***@host");
    }

    #[test]
    fn urls_without_user_info_are_unchanged() {
        for url in [
            "nats://127.0.0.1:4222",
            "http://nats-srv:4222",
            "127.0.0.1:4222",
            "",
            "mongodb://h1:27017,h2:27017/tickets?replicaSet=rs0",
        ] {
            assert_eq!(redact_url(url), url);
        }
    }
}
