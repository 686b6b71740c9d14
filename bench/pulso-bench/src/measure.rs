//! What the servers spent during a run, read before publishing starts and
//! after the last delivery: the CPU time of their processes
//! (`/proc/<pid>/stat`), Redis's commands, bytes and CPU (`INFO all`), and
//! each pulso node's backplane counters (`/metrics`).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::fanout::round;
use crate::net::{self, Result, err};

#[derive(clap::Args, Clone, Debug, Default)]
pub struct MeasureArgs {
    /// Server processes (comma-separated pids) whose CPU time (utime +
    /// stime) over the run is reported, summed and per delivery.
    #[arg(long, value_delimiter = ',')]
    pub pids: Vec<u32>,
    /// A Redis (`127.0.0.1:PORT` or `redis://127.0.0.1:PORT`, loopback, no
    /// password) whose commands, bytes and CPU over the run are reported
    /// per message (`INFO all` before and after).
    #[arg(long)]
    pub redis: Option<String>,
    /// pulso nodes (comma-separated URLs) whose
    /// `pulso_cluster_messages_total` counters over the run are reported
    /// per node, in this order.
    #[arg(long, value_delimiter = ',')]
    pub metrics_url: Vec<String>,
}

const KINDS: [&str; 5] = ["sent", "received", "duplicate", "unsent", "invalid"];

/// Readings at one instant.
pub struct Snapshot {
    cpu_ticks: Vec<Option<u64>>,
    /// `INFO all`, and the length of its answer.
    redis: Option<(BTreeMap<String, String>, usize)>,
    cluster: Vec<Option<Vec<f64>>>,
}

/// The resolved targets of [`MeasureArgs`].
pub struct Probe {
    pids: Vec<u32>,
    redis: Option<SocketAddr>,
    nodes: Vec<(String, SocketAddr)>,
}

impl Probe {
    pub fn new(a: &MeasureArgs) -> Result<Probe> {
        let redis = match &a.redis {
            Some(url) => Some(crate::resolve(url.trim_start_matches("redis://"))?),
            None => None,
        };
        let nodes = a
            .metrics_url
            .iter()
            .map(|u| Ok((u.clone(), crate::resolve(u)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Probe {
            pids: a.pids.clone(),
            redis,
            nodes,
        })
    }

    pub async fn snapshot(&self) -> Result<Snapshot> {
        let redis = match self.redis {
            Some(addr) => Some(redis_info(addr).await?),
            None => None,
        };
        let names: Vec<String> = KINDS
            .iter()
            .map(|k| format!("pulso_cluster_messages_total{{kind=\"{k}\"}}"))
            .collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut cluster = Vec::new();
        for (_, addr) in &self.nodes {
            cluster.push(net::scrape(*addr, &names).await.ok());
        }
        Ok(Snapshot {
            cpu_ticks: self.pids.iter().map(|&p| cpu_ticks(p)).collect(),
            redis,
            cluster,
        })
    }

    /// Adds the differences between `before` and `after` to `out`:
    /// `deliveries` and `messages` scale the per-delivery and per-message
    /// figures.
    pub fn report(
        &self,
        before: &Snapshot,
        after: &Snapshot,
        deliveries: u64,
        messages: u64,
        out: &mut Value,
    ) {
        if !self.pids.is_empty() {
            let tick_us = 1e6 / clock_ticks_per_s();
            let per: Vec<Option<f64>> = before
                .cpu_ticks
                .iter()
                .zip(&after.cpu_ticks)
                .map(|(b, a)| Some(a.as_ref()?.saturating_sub(*b.as_ref()?) as f64 * tick_us))
                .collect();
            let known = per.iter().all(Option::is_some);
            let total: f64 = per.iter().flatten().sum();
            out["server_pids"] = json!(self.pids);
            out["server_cpu_s"] = json!(
                per.iter()
                    .map(|u| u.map(|u| round(u / 1e6, 2)))
                    .collect::<Vec<_>>()
            );
            out["server_cpu_s_total"] = json!(round(total / 1e6, 2));
            out["cpu_us_per_delivery"] = if known && deliveries > 0 {
                json!(round(total / deliveries as f64, 3))
            } else {
                Value::Null
            };
        }
        if let (Some(b), Some(a)) = (&before.redis, &after.redis) {
            redis_report(b, a, messages, out);
        }
        if !self.nodes.is_empty() {
            let nodes: Vec<Value> = self
                .nodes
                .iter()
                .enumerate()
                .map(|(i, (url, _))| {
                    let mut node = Map::new();
                    node.insert("url".into(), json!(url));
                    match (&before.cluster[i], &after.cluster[i]) {
                        (Some(b), Some(a)) => {
                            for (k, kind) in KINDS.iter().enumerate() {
                                node.insert((*kind).into(), json!((a[k] - b[k]).round() as u64));
                            }
                        }
                        _ => {
                            node.insert("error".into(), json!("/metrics unreadable"));
                        }
                    }
                    Value::Object(node)
                })
                .collect();
            out["cluster_messages"] = json!(nodes);
        }
    }
}

fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// utime + stime of a process (all its threads), in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is
    // field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

const INFO: &[u8] = b"*2\r\n$4\r\nINFO\r\n$3\r\nall\r\n";

/// `INFO all` as `field -> value`, and the bytes of the answer.
async fn redis_info(addr: SocketAddr) -> Result<(BTreeMap<String, String>, usize)> {
    let mut s = net::tcp(addr, None).await?;
    s.write_all(INFO).await?;
    let mut buf = Vec::with_capacity(16 * 1024);
    let body = loop {
        if let Some(nl) = net::find(&buf, b"\r\n") {
            if buf[0] != b'$' {
                return Err(err(format!(
                    "Redis answered INFO with {}",
                    String::from_utf8_lossy(&buf[..nl])
                )));
            }
            let len: usize = std::str::from_utf8(&buf[1..nl])
                .ok()
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| err("bad INFO answer"))?;
            if buf.len() >= nl + 2 + len + 2 {
                break String::from_utf8_lossy(&buf[nl + 2..nl + 2 + len]).into_owned();
            }
        }
        let mut chunk = [0u8; 8192];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(err("Redis closed the connection during INFO"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let answer = buf.len();
    let info = body
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect();
    Ok((info, answer))
}

/// `calls=` of a `cmdstat_<name>` line.
fn calls(info: &BTreeMap<String, String>, key: &str) -> u64 {
    info.get(key)
        .and_then(|v| v.split(',').find_map(|kv| kv.strip_prefix("calls=")))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Redis over the run. The probe's own traffic is left out: the first
/// INFO (counted in `after`, not in `before`), its answer's bytes and the
/// second INFO's request bytes.
fn redis_report(
    (b, b_answer): &(BTreeMap<String, String>, usize),
    (a, _): &(BTreeMap<String, String>, usize),
    messages: u64,
    out: &mut Value,
) {
    let num = |m: &BTreeMap<String, String>, k: &str| {
        m.get(k).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
    };
    let delta = |k: &str| num(a, k) - num(b, k);
    // Commands by name, the probe's own INFO left out.
    let mut by_name = Map::new();
    let mut total = 0u64;
    for key in a.keys().filter(|k| k.starts_with("cmdstat_")) {
        let name = &key["cmdstat_".len()..];
        let n = calls(a, key).saturating_sub(calls(b, key));
        if n == 0 || name == "info" {
            continue;
        }
        total += n;
        by_name.insert(name.to_string(), json!(n));
    }
    let per_msg = |x: f64| {
        if messages > 0 {
            json!(round(x / messages as f64, 3))
        } else {
            Value::Null
        }
    };
    out["redis_commands"] = json!(total);
    out["redis_commands_by_name"] = Value::Object(by_name);
    out["redis_commands_per_message"] = per_msg(total as f64);
    // total_commands_processed counts the probe's first INFO too.
    out["redis_total_commands_processed"] = json!(delta("total_commands_processed") as u64);
    let in_bytes = delta("total_net_input_bytes") - INFO.len() as f64;
    let out_bytes = delta("total_net_output_bytes") - *b_answer as f64;
    out["redis_in_bytes"] = json!(in_bytes.max(0.0) as u64);
    out["redis_out_bytes"] = json!(out_bytes.max(0.0) as u64);
    out["redis_in_bytes_per_message"] = per_msg(in_bytes.max(0.0));
    out["redis_out_bytes_per_message"] = per_msg(out_bytes.max(0.0));
    let cpu = delta("used_cpu_sys") + delta("used_cpu_user");
    out["redis_cpu_s"] = json!(round(cpu, 3));
    out["redis_cpu_us_per_message"] = per_msg(cpu * 1e6);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn redis_figures_leave_the_probe_out() {
        let before = info(&[
            ("total_commands_processed", "100"),
            ("total_net_input_bytes", "1000"),
            ("total_net_output_bytes", "5000"),
            ("used_cpu_sys", "1.0"),
            ("used_cpu_user", "2.0"),
            ("cmdstat_info", "calls=3,usec=30"),
            ("cmdstat_publish", "calls=10,usec=5"),
        ]);
        let after = info(&[
            ("total_commands_processed", "131"),
            ("total_net_input_bytes", "3023"),
            ("total_net_output_bytes", "9700"),
            ("used_cpu_sys", "1.5"),
            ("used_cpu_user", "2.5"),
            ("cmdstat_info", "calls=4,usec=40"),
            ("cmdstat_publish", "calls=20,usec=9"),
            ("cmdstat_multi", "calls=10,usec=1"),
            ("cmdstat_exec", "calls=10,usec=1"),
        ]);
        let mut out = json!({});
        redis_report(&(before, 700), &(after, 700), 10, &mut out);
        assert_eq!(out["redis_commands"], 30);
        assert_eq!(out["redis_commands_per_message"], 3.0);
        assert_eq!(out["redis_commands_by_name"]["publish"], 10);
        assert!(out["redis_commands_by_name"].get("info").is_none());
        assert_eq!(out["redis_in_bytes"], 2000);
        assert_eq!(out["redis_out_bytes"], 4000);
        assert_eq!(out["redis_out_bytes_per_message"], 400.0);
        assert_eq!(out["redis_cpu_s"], 1.0);
    }

    #[test]
    fn cpu_ticks_of_this_process() {
        assert!(cpu_ticks(std::process::id()).is_some());
        assert!(cpu_ticks(u32::MAX).is_none());
    }
}
