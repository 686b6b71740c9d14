//! Parsers for the value syntaxes every setting shares, whatever its source.
//!
//! A value arrives either as TOML (from the config file) or as text (a flag,
//! an environment variable, or the built-in default). Both spellings go
//! through the same functions so `2s` means the same thing everywhere.

use std::time::Duration;

/// A setting's value before it is given its type.
#[derive(Debug, Clone)]
pub enum Raw {
    Toml(toml::Value),
    Text(String),
}

/// The longest duration accepted (about 317 years).
const MAX_SECS: f64 = 1e10;

pub fn parse_duration(raw: &Raw) -> Result<Duration, String> {
    match raw {
        // Numbers are seconds, bounded like text so later arithmetic on
        // instants cannot overflow.
        Raw::Toml(toml::Value::Integer(n)) if (0..=MAX_SECS as i64).contains(n) => {
            Ok(Duration::from_secs(*n as u64))
        }
        Raw::Toml(toml::Value::Float(f)) if (0.0..=MAX_SECS).contains(f) => {
            Ok(Duration::from_secs_f64(*f))
        }
        Raw::Toml(toml::Value::String(s)) | Raw::Text(s) => duration_text(s.trim()),
        _ => Err("expected a duration such as 2, 500ms, 2s, 5m or 1h".into()),
    }
}

fn duration_text(s: &str) -> Result<Duration, String> {
    let err = || format!("`{s}` is not a duration (use 2, 500ms, 2s, 5m or 1h)");
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| err())?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        _ => return Err(err()),
    };
    if !secs.is_finite() || !(0.0..=MAX_SECS).contains(&secs) {
        return Err(err());
    }
    Ok(Duration::from_secs_f64(secs))
}

pub fn parse_size(raw: &Raw) -> Result<u64, String> {
    match raw {
        Raw::Toml(toml::Value::Integer(n)) if *n >= 0 => Ok(*n as u64),
        Raw::Toml(toml::Value::String(s)) | Raw::Text(s) => size_text(s.trim()),
        _ => Err("expected a size such as 65536, 64KiB or 1MiB".into()),
    }
}

fn size_text(s: &str) -> Result<u64, String> {
    let err = || format!("`{s}` is not a size (use 65536, 64KiB, 1MiB)");
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| err())?;
    let mult: u64 = match unit.trim() {
        "" | "B" | "b" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "KB" | "kB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(err()),
    };
    n.checked_mul(mult).ok_or_else(err)
}

pub fn parse_bool(raw: &Raw) -> Result<bool, String> {
    match raw {
        Raw::Toml(toml::Value::Boolean(b)) => Ok(*b),
        Raw::Toml(toml::Value::Integer(1)) => Ok(true),
        Raw::Toml(toml::Value::Integer(0)) => Ok(false),
        Raw::Toml(toml::Value::String(s)) | Raw::Text(s) => match s.trim() {
            "true" | "1" => Ok(true),
            "false" | "0" => Ok(false),
            other => Err(format!(
                "`{other}` is not a boolean (use true/false or 1/0)"
            )),
        },
        _ => Err("expected true or false".into()),
    }
}

pub fn parse_u64(raw: &Raw) -> Result<u64, String> {
    match raw {
        Raw::Toml(toml::Value::Integer(n)) if *n >= 0 => Ok(*n as u64),
        Raw::Toml(toml::Value::String(s)) | Raw::Text(s) => s
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not a non-negative whole number")),
        _ => Err("expected a non-negative whole number".into()),
    }
}

pub fn parse_string(raw: &Raw) -> Result<String, String> {
    match raw {
        Raw::Toml(toml::Value::String(s)) | Raw::Text(s) => Ok(s.clone()),
        Raw::Toml(toml::Value::Integer(n)) => Ok(n.to_string()),
        _ => Err("expected a string".into()),
    }
}

/// Lists are TOML arrays, or comma-separated text; an empty text is an empty list.
pub fn parse_list(raw: &Raw) -> Result<Vec<String>, String> {
    match raw {
        Raw::Toml(toml::Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(n) => Ok(n.to_string()),
                _ => Err("expected a list of strings".to_string()),
            })
            .collect(),
        Raw::Toml(toml::Value::String(s)) | Raw::Text(s) => Ok(s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()),
        _ => Err("expected a list of strings".into()),
    }
}

/// Map-shaped settings (such as `acl`) are TOML tables; as text they are an
/// inline table, e.g. `PULSO_ACL='{ admin = { publish = ["#"] } }'`.
pub fn parse_table(raw: &Raw) -> Result<toml::Table, String> {
    match raw {
        Raw::Toml(toml::Value::Table(t)) => Ok(t.clone()),
        Raw::Toml(toml::Value::String(s)) | Raw::Text(s) => {
            let s = s.trim();
            if s.is_empty() {
                return Ok(toml::Table::new());
            }
            let mut doc: toml::Table = toml::from_str(&format!("v = {s}"))
                .map_err(|e| format!("not a TOML inline table: {}", e.message()))?;
            match doc.remove("v") {
                Some(toml::Value::Table(t)) => Ok(t),
                _ => Err(
                    "expected a TOML inline table such as { admin = { publish = [\"#\"] } }".into(),
                ),
            }
        }
        _ => Err("expected a table".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Raw {
        Raw::Text(s.into())
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration(&t("2")).unwrap(), Duration::from_secs(2));
        assert_eq!(
            parse_duration(&t("500ms")).unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(parse_duration(&t("1h")).unwrap(), Duration::from_secs(3600));
        assert_eq!(
            parse_duration(&Raw::Toml(toml::Value::Integer(3))).unwrap(),
            Duration::from_secs(3)
        );
        assert!(parse_duration(&t("2 parsecs")).is_err());
        assert!(parse_duration(&t("")).is_err());
        assert!(parse_duration(&t("-1")).is_err());
        assert!(parse_duration(&Raw::Toml(toml::Value::Float(1e30))).is_err());
        assert!(parse_duration(&Raw::Toml(toml::Value::Integer(i64::MAX))).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size(&t("64KiB")).unwrap(), 65536);
        assert_eq!(parse_size(&t("1MiB")).unwrap(), 1 << 20);
        assert_eq!(parse_size(&t("100")).unwrap(), 100);
        assert!(parse_size(&t("1XB")).is_err());
        assert!(parse_size(&t("99999999999999999999GiB")).is_err());
    }

    #[test]
    fn bools_lists_tables() {
        assert!(parse_bool(&t("1")).unwrap());
        assert!(!parse_bool(&t("false")).unwrap());
        assert!(parse_bool(&t("yes")).is_err());
        assert_eq!(parse_list(&t("a, b,,c")).unwrap(), vec!["a", "b", "c"]);
        assert!(parse_list(&t("")).unwrap().is_empty());
        let table = parse_table(&t(r##"{ admin = { publish = ["#"] } }"##)).unwrap();
        assert!(table.contains_key("admin"));
        assert!(parse_table(&t("[1]")).is_err());
    }
}
