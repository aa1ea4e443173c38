//! Synapse's replication commands as they travel on Redis: one line each,
//! `NAME <args>`. Only what we act on is parsed.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// `RDATA <stream> <instance> <token|batch> <row json>`; `token` is
    /// `None` for `batch` rows (more rows with the same token follow).
    Rdata { stream: String, instance: String, token: Option<i64>, row: Value },
    /// `POSITION <stream> <instance> <prev_token> <new_token>`: the instance
    /// wrote nothing in `(prev, new]` that was not already announced.
    Position { stream: String, instance: String, prev: i64, new: i64 },
    /// Anything else (`REPLICATE`, `USER_SYNC`, ...), or a line we cannot read.
    Other,
}

pub fn parse(line: &str) -> Command {
    let (name, rest) = line.split_once(' ').unwrap_or((line, ""));
    match name {
        "RDATA" => {
            let mut parts = rest.splitn(4, ' ');
            let (Some(stream), Some(instance), Some(token), Some(row)) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
                return Command::Other;
            };
            let token = match token {
                "batch" => None,
                t => match t.parse() {
                    Ok(n) => Some(n),
                    Err(_) => return Command::Other,
                },
            };
            match serde_json::from_str(row) {
                Ok(row) => Command::Rdata { stream: stream.into(), instance: instance.into(), token, row },
                Err(_) => Command::Other,
            }
        }
        "POSITION" => {
            let parts: Vec<&str> = rest.split(' ').collect();
            match parts.as_slice() {
                [stream, instance, prev, new] => match (prev.parse(), new.parse()) {
                    (Ok(prev), Ok(new)) => Command::Position { stream: (*stream).into(), instance: (*instance).into(), prev, new },
                    _ => Command::Other,
                },
                _ => Command::Other,
            }
        }
        _ => Command::Other,
    }
}

/// A `device_lists` row, `[user_id, is_signature, hosts_calculated]` (or
/// the older `[user_id, is_signature]`): the user whose caches to drop, or
/// `None` for rows that change nothing we hold.
pub fn device_list_user(row: &Value) -> Option<&str> {
    let items = row.as_array()?;
    let user = items.first()?.as_str()?;
    // hosts_calculated rows repeat an earlier change for outbound pokes.
    if items.get(2).and_then(Value::as_bool) == Some(true) {
        return None;
    }
    Some(user)
}

/// A `caches` row, `[cache_func, keys | null, invalidation_ts]`.
pub fn cache_row(row: &Value) -> Option<(&str, Option<Vec<String>>)> {
    let items = row.as_array()?;
    let func = items.first()?.as_str()?;
    let keys = match items.get(1) {
        Some(Value::Array(keys)) => Some(keys.iter().map(|k| k.as_str().map_or_else(|| k.to_string(), str::to_owned)).collect()),
        _ => None,
    };
    Some((func, keys))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_rdata_and_position() {
        assert_eq!(
            parse(r#"RDATA device_lists master 6 ["@bob:hs",false,false]"#),
            Command::Rdata {
                stream: "device_lists".into(),
                instance: "master".into(),
                token: Some(6),
                row: json!(["@bob:hs", false, false])
            }
        );
        assert_eq!(
            parse(r#"RDATA caches master batch ["get_device",["@bob:hs","BOBDEV"],1795675889447]"#),
            Command::Rdata {
                stream: "caches".into(),
                instance: "master".into(),
                token: None,
                row: json!(["get_device", ["@bob:hs", "BOBDEV"], 1795675889447u64])
            }
        );
        assert_eq!(
            parse("POSITION caches master 10 12"),
            Command::Position { stream: "caches".into(), instance: "master".into(), prev: 10, new: 12 }
        );
        for other in ["REPLICATE ", "REPLICATE", "RDATA x y", "RDATA s i notanumber []", "RDATA s i 1 {bad", "POSITION a b c d", ""] {
            assert_eq!(parse(other), Command::Other, "{other:?}");
        }
    }

    #[test]
    fn rows() {
        assert_eq!(device_list_user(&json!(["@a:hs", false, false])), Some("@a:hs"));
        assert_eq!(device_list_user(&json!(["@a:hs", true])), Some("@a:hs"));
        assert_eq!(device_list_user(&json!(["@a:hs", false, true])), None);
        assert_eq!(
            cache_row(&json!(["get_user_by_access_token", ["syt_x"], 1])),
            Some(("get_user_by_access_token", Some(vec!["syt_x".to_string()])))
        );
        assert_eq!(cache_row(&json!(["f", null, 1])), Some(("f", None)));
    }
}
