//! Output: one JSON line, then a readable table of the same fields.

use hdrhistogram::Histogram;
use serde_json::{Value, json};

/// Adds latency percentiles (milliseconds) from a histogram in microseconds.
pub fn add_latency(out: &mut Value, hist: &Histogram<u64>) {
    let ms = |us: u64| (us as f64 / 1000.0 * 1000.0).round() / 1000.0;
    if hist.is_empty() {
        return;
    }
    out["p50_ms"] = json!(ms(hist.value_at_quantile(0.50)));
    out["p90_ms"] = json!(ms(hist.value_at_quantile(0.90)));
    out["p99_ms"] = json!(ms(hist.value_at_quantile(0.99)));
    out["p999_ms"] = json!(ms(hist.value_at_quantile(0.999)));
    out["max_ms"] = json!(ms(hist.max()));
}

/// `[code, count]` pairs, most frequent first.
pub fn count_codes(codes: &[u16]) -> Vec<(u16, usize)> {
    let mut v: Vec<(u16, usize)> = Vec::new();
    for &c in codes {
        match v.iter_mut().find(|(k, _)| *k == c) {
            Some(e) => e.1 += 1,
            None => v.push((c, 1)),
        }
    }
    v.sort_by_key(|e| std::cmp::Reverse(e.1));
    v
}

pub fn emit(v: &Value) {
    println!("{v}");
    if let Value::Object(map) = v {
        let width = map.keys().map(|k| k.len()).max().unwrap_or(0);
        for (k, val) in map {
            let text = match val {
                Value::String(s) => s.clone(),
                Value::Null => "-".into(),
                other => other.to_string(),
            };
            eprintln!("  {k:<width$}  {text}");
        }
    }
}
