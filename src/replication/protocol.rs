//! Synapse's replication commands as they travel on Redis: one line each,
//! `NAME <args>`. Only what we act on is parsed.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// `RDATA <stream> <instance> <token|batch> <row json>`; `token` is
    /// `None` for `batch` rows (more rows with the same token follow). A
    /// row we cannot read comes as `null`, without a token: its stream
    /// changed, we cannot tell how.
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
            let (Some(stream), Some(instance)) = (parts.next(), parts.next()) else {
                return Command::Other;
            };
            let token = parts.next().map(str::parse::<i64>);
            let row = parts.next().and_then(|r| serde_json::from_str(r).ok());
            let (token, row) = match (token, row) {
                (Some(Ok(t)), Some(row)) => (Some(t), row),
                (Some(Err(_)), Some(row)) if rest.split(' ').nth(2) == Some("batch") => (None, row),
                _ => (None, Value::Null),
            };
            Command::Rdata { stream: stream.into(), instance: instance.into(), token, row }
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

/// What a `device_lists` row changes.
#[derive(Debug, PartialEq)]
pub enum DeviceListRow<'a> {
    /// This user's devices, keys or signatures.
    User(&'a str),
    /// Nothing we hold (a `hosts_calculated` row repeats an earlier change
    /// for outbound pokes).
    Repeat,
    /// A row we cannot read.
    Unreadable,
}

/// A `device_lists` row, `[user_id, is_signature, hosts_calculated]` (or
/// the older `[user_id, is_signature]`).
pub fn device_list_row(row: &Value) -> DeviceListRow<'_> {
    let Some(user) = row.as_array().and_then(|items| items.first()).and_then(Value::as_str) else {
        return DeviceListRow::Unreadable;
    };
    if row.get(2).and_then(Value::as_bool) == Some(true) { DeviceListRow::Repeat } else { DeviceListRow::User(user) }
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
        for other in ["REPLICATE ", "REPLICATE", "RDATA x", "POSITION a b c d", ""] {
            assert_eq!(parse(other), Command::Other, "{other:?}");
        }
        // An RDATA we cannot read: its stream changed, how is unknown.
        for unreadable in ["RDATA s i", "RDATA s i notanumber []", "RDATA s i 1 {bad"] {
            let want = Command::Rdata { stream: "s".into(), instance: "i".into(), token: None, row: Value::Null };
            assert_eq!(parse(unreadable), want, "{unreadable:?}");
        }
    }

    #[test]
    fn rows() {
        assert_eq!(device_list_row(&json!(["@a:hs", false, false])), DeviceListRow::User("@a:hs"));
        assert_eq!(device_list_row(&json!(["@a:hs", true])), DeviceListRow::User("@a:hs"));
        assert_eq!(device_list_row(&json!(["@a:hs", false, true])), DeviceListRow::Repeat);
        assert_eq!(device_list_row(&Value::Null), DeviceListRow::Unreadable);
        assert_eq!(device_list_row(&json!([7])), DeviceListRow::Unreadable);
        assert_eq!(
            cache_row(&json!(["get_user_by_access_token", ["syt_x"], 1])),
            Some(("get_user_by_access_token", Some(vec!["syt_x".to_string()])))
        );
        assert_eq!(cache_row(&json!(["f", null, 1])), Some(("f", None)));
    }
}
