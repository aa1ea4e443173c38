//! Query-string parameters, read as Twisted reads them: blank values kept,
//! a repeated name keeps its first value for single-valued parameters.

use crate::error::MatrixError;
use crate::ids::parse_python_int;

#[derive(Debug, Default, Clone)]
pub struct QueryParams(Vec<(String, String)>);

impl QueryParams {
    pub fn parse(query: Option<&str>) -> Self {
        Self(url::form_urlencoded::parse(query.unwrap_or("").as_bytes()).into_owned().collect())
    }

    pub fn first(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// Synapse's `parse_integer(request, name)` for a non-negative integer:
    /// absent → `None`; not an integer or negative → 400 `M_INVALID_PARAM`.
    pub fn non_negative_int(&self, name: &str) -> Result<Option<u64>, MatrixError> {
        let Some(raw) = self.first(name) else { return Ok(None) };
        let n = parse_python_int(raw).ok_or_else(|| MatrixError::invalid_param(format!("Query parameter {name} must be an integer")))?;
        if n < 0 {
            return Err(MatrixError::invalid_param(format!("Query parameter {name} must be a positive integer.")));
        }
        Ok(Some(u64::try_from(n).unwrap_or(u64::MAX)))
    }

    /// Synapse's `parse_boolean(request, name, default)`: `true` or `false`,
    /// anything else 400 `M_INVALID_PARAM`.
    pub fn boolean(&self, name: &str, default: bool) -> Result<bool, MatrixError> {
        match self.first(name) {
            None => Ok(default),
            Some("true") => Ok(true),
            Some("false") => Ok(false),
            Some(_) => Err(MatrixError::invalid_param(format!("Boolean query parameter '{name}' must be one of ['true', 'false']"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ints_like_synapse() {
        let p = QueryParams::parse(Some("timeout=%2B1_000&a=x&neg=-1&t2=abc&timeout=5"));
        assert_eq!(p.non_negative_int("timeout").unwrap(), Some(1000));
        assert_eq!(p.non_negative_int("missing").unwrap(), None);
        assert_eq!(p.non_negative_int("neg").unwrap_err().errcode, "M_INVALID_PARAM");
        assert_eq!(p.non_negative_int("t2").unwrap_err().errcode, "M_INVALID_PARAM");
        assert_eq!(p.first("a"), Some("x"));
    }

    #[test]
    fn booleans_like_synapse() {
        let p = QueryParams::parse(Some("a=true&b=false&c=1&d="));
        assert!(p.boolean("a", false).unwrap());
        assert!(!p.boolean("b", true).unwrap());
        assert!(p.boolean("missing", true).unwrap());
        assert_eq!(p.boolean("c", false).unwrap_err().errcode, "M_INVALID_PARAM");
        assert_eq!(p.boolean("d", false).unwrap_err().errcode, "M_INVALID_PARAM");
    }
}
