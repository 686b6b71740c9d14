//! The metrics reference against what a running server exports, and the
//! Grafana dashboard against the reference.

mod common;

use std::collections::BTreeSet;

use common::*;
use serde_json::{Value, json};

/// The family a series belongs to (`pulso_x_total` → `x`), by its type.
fn family_of(series: &str) -> Option<&'static pulso::metrics::MetricDoc> {
    let name = series.strip_prefix("pulso_")?;
    pulso::metrics::METRICS.iter().find(|d| {
        [d.name.to_string()]
            .into_iter()
            .chain(["_total", "_bucket", "_sum", "_count"].map(|s| format!("{}{s}", d.name)))
            .any(|n| n == name)
    })
}

/// Every series a live server exports after some traffic belongs to a
/// documented family and carries only the documented label (`le` on a
/// histogram's buckets).
#[tokio::test]
async fn exported_series_have_the_documented_names_and_labels() {
    let srv = TestServer::start().await;
    let mut c = srv.ws("assistant", "1").await;
    c.sub("m").await;
    srv.publish("m", json!(1)).await;
    c.recv().await;
    c.send_text("oops").await;
    c.recv().await;
    let (status, _) = post_json(&srv.url("/api/publish"), Some("garbage"), "{}").await;
    assert_eq!(status, 401);

    let text = srv.metrics().await;
    let mut seen = BTreeSet::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let series = line.split(['{', ' ']).next().unwrap_or_default();
        let doc = family_of(series).unwrap_or_else(|| panic!("undocumented series: {line}"));
        seen.insert(doc.name);
        let labels: Vec<&str> = match line.split_once('{') {
            Some((_, rest)) => rest
                .split_once('}')
                .map(|(inside, _)| inside)
                .unwrap_or_default()
                .split(',')
                .filter_map(|kv| kv.split_once('=').map(|(k, _)| k))
                .collect(),
            None => Vec::new(),
        };
        for label in labels {
            let documented = doc.label.map(|(l, _)| l) == Some(label)
                || (label == "le" && series.ends_with("_bucket"));
            assert!(documented, "{series}: label `{label}` is not documented");
        }
    }
    // What the traffic above must have produced, labels included.
    for (family, needle) in [
        ("connections", "pulso_connections{protocol=\"ws\"} 1"),
        (
            "auth_failures",
            "pulso_auth_failures_total{reason=\"invalid\"} 1",
        ),
        (
            "client_errors",
            "pulso_client_errors_total{code=\"bad_request\"} 1",
        ),
        (
            "presence_writes",
            "pulso_presence_writes_total{result=\"ok\"} 1",
        ),
    ] {
        assert!(seen.contains(family), "{family}");
        assert!(text.contains(needle), "{needle} in\n{text}");
    }
    // The client's ack waited for its presence row: one commit was timed.
    let commits = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("pulso_stage_latency_seconds_count{stage=\"presence_commit\"} ")
        })
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(commits >= 1, "presence commits timed: {commits}\n{text}");
    srv.stop().await;
}

/// Series names listed in docs/metrics.md (its first column).
fn reference_series() -> BTreeSet<String> {
    let doc =
        std::fs::read_to_string(format!("{}/docs/metrics.md", env!("CARGO_MANIFEST_DIR"))).unwrap();
    doc.lines()
        .filter_map(|l| l.strip_prefix("| `pulso_"))
        .filter_map(|l| l.split(" | ").next())
        .flat_map(|cell| {
            format!("`pulso_{cell}")
                .split(", ")
                .map(|s| s.trim_matches('`').to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "query", Value::String(s)) => out.push(s.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

/// Every metric the dashboard queries is in the reference, and it covers
/// what an operator watches.
#[test]
fn grafana_dashboard_uses_only_documented_metrics() {
    let known = reference_series();
    assert!(known.contains("pulso_connections"), "{known:?}");
    assert!(
        known.contains("pulso_stage_latency_seconds_bucket"),
        "{known:?}"
    );
    let path = format!("{}/docs/grafana/pulso.json", env!("CARGO_MANIFEST_DIR"));
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .expect("docs/grafana/pulso.json is JSON");
    assert!(
        dashboard["panels"]
            .as_array()
            .is_some_and(|p| !p.is_empty())
    );
    let mut all = Vec::new();
    exprs(&dashboard, &mut all);
    let mut used = BTreeSet::new();
    for expr in &all {
        let bytes = expr.as_bytes();
        let mut i = 0;
        while let Some(at) = expr[i..].find("pulso_").map(|p| p + i) {
            let end = expr[at..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(expr.len(), |e| at + e);
            // A metric name, not part of a longer identifier.
            if at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_') {
                let name = &expr[at..end];
                assert!(
                    known.contains(name),
                    "`{name}` (in `{expr}`) is not in docs/metrics.md"
                );
                used.insert(name.to_string());
            }
            i = end;
        }
    }
    for wanted in [
        "pulso_connections",
        "pulso_messages_published_total",
        "pulso_messages_delivered_total",
        "pulso_slow_consumer_closes_total",
        "pulso_stage_latency_seconds_bucket",
        "pulso_cluster_up",
        "pulso_mqtt_connected",
    ] {
        assert!(used.contains(wanted), "the dashboard shows {wanted}");
    }
    assert!(
        all.iter().any(|e| e.contains("stage=\"presence_commit\"")),
        "presence write latency"
    );
}
