//! `bulkhead status`: a running bulkhead's view for a person at a terminal, read from its
//! health port (/health and /sessions), like PgBouncer's SHOW commands. `--watch` redraws it.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::Value;

/// How long one read of the health port may take.
const READ_TIMEOUT: Duration = Duration::from_secs(3);
/// The largest answer read: /sessions of tens of thousands of clients.
const MAX_BODY: usize = 64 << 20;

/// What `bulkhead status` was asked for.
#[derive(Debug, Clone)]
pub struct Options {
    /// The health port, `host:port`.
    pub health: String,
    /// Redraw every this often, until interrupted.
    pub watch: Option<Duration>,
    /// Sessions listed at most (the longest-running first).
    pub sessions: usize,
}

/// Prints the status once, or again and again with `watch`. Returns false when the health
/// port could not be read (once: at all; with `watch`: the last time).
pub fn run(options: &Options) -> bool {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bulkhead status: cannot start a runtime: {e}");
            return false;
        }
    };
    runtime.block_on(async {
        loop {
            let shown = read(&options.health, options.sessions).await;
            let Some(every) = options.watch else {
                return match shown {
                    Ok(text) => {
                        print!("{text}");
                        true
                    }
                    Err(why) => {
                        eprintln!("bulkhead status: {why}");
                        false
                    }
                };
            };
            // Home and clear, then the frame: a terminal shows only the newest.
            let frame = match shown {
                Ok(text) => text,
                Err(why) => format!(
                    "{why}\n(retrying every {})\n",
                    humantime::format_duration(every)
                ),
            };
            print!("\x1b[H\x1b[2J{frame}");
            use std::io::Write;
            let _ = std::io::stdout().flush();
            tokio::time::sleep(every).await;
        }
    })
}

/// Reads /health and /sessions and renders them.
async fn read(health: &str, top: usize) -> Result<String, String> {
    let unreachable =
        |why: String| format!("cannot read bulkhead's health port at {health}: {why}");
    let (status, body) = crate::http_get::get(health, "/health", READ_TIMEOUT, MAX_BODY)
        .await
        .map_err(unreachable)?;
    if !status.is_success() {
        return Err(unreachable(format!("/health answered HTTP {status}")));
    }
    let doc: Value = serde_json::from_slice(&body)
        .map_err(|e| unreachable(format!("/health is not bulkhead's JSON: {e}")))?;
    let sessions = match crate::http_get::get(health, "/sessions", READ_TIMEOUT, MAX_BODY).await {
        Ok((status, body)) if status.is_success() => serde_json::from_slice(&body).ok(),
        _ => None,
    };
    Ok(render(health, &doc, sessions.as_ref(), top))
}

/// The text a person reads: readiness, hosts, pools, and the busiest sessions.
pub fn render(health: &str, doc: &Value, sessions: Option<&Value>, top: usize) -> String {
    let mut out = String::new();
    let now = crate::sessions::rfc3339(std::time::SystemTime::now());
    let ready = if doc["ready"] == true {
        "ready".to_string()
    } else {
        format!("NOT READY: {}", str_or(&doc["reason"], "?"))
    };
    let _ = writeln!(
        out,
        "bulkhead at {health}  {}  {ready}  {now}",
        str_or(&doc["status"], "?")
    );
    let _ = writeln!(
        out,
        "primary {}   discovery {}   pool mode {}   clients {}   in flight {} (writes {}){}",
        str_or(&doc["primary"], "none"),
        str_or(&doc["discovery"]["source"], "probe"),
        str_or(&doc["pool_mode"], "passthrough"),
        doc["clients"],
        doc["inflight"],
        doc["inflight_writes"],
        if doc["draining"] == true {
            "   DRAINING"
        } else {
            ""
        },
    );
    if let Some(conflict) = doc["conflict"].as_str() {
        let _ = writeln!(out, "conflict: {conflict}");
    }
    if doc["discovery"]["source"] == "patroni" {
        let d = &doc["discovery"];
        let _ = writeln!(
            out,
            "patroni: {} (leader {}){}",
            if d["following"] == true {
                "following"
            } else {
                "NOT following: bulkhead's own probes decide"
            },
            str_or(&d["leader"], "none"),
            d["error"]
                .as_str()
                .map(|e| format!("  error: {e}"))
                .unwrap_or_default(),
        );
    }

    out.push('\n');
    let mut hosts = vec![row(&[
        "HOST",
        "ROLE",
        "CIRCUIT",
        "ANSWERING",
        "LAG",
        "PROBED",
        "PROBLEM",
    ])];
    for b in doc["backends"].as_array().into_iter().flatten() {
        let problem = ["circuit_reason", "write_check", "error"]
            .iter()
            .find_map(|k| b[k].as_str())
            .unwrap_or("");
        hosts.push(row(&[
            str_or(&b["address"], "?"),
            str_or(&b["role"], "?"),
            str_or(&b["circuit"], "?"),
            if b["answering"] == false { "NO" } else { "yes" },
            &b["replay_lag_ms"]
                .as_u64()
                .map_or("-".into(), |ms| format!("{ms} ms")),
            &b["last_probe_age_ms"]
                .as_u64()
                .map_or("never".into(), |ms| format!("{ms} ms ago")),
            problem,
        ]));
    }
    table(&mut out, &hosts);

    if let Some(pools) = doc["pools"].as_array().filter(|p| !p.is_empty()) {
        out.push('\n');
        let mut rows = vec![row(&[
            "POOL USER",
            "DATABASE",
            "LISTENER",
            "ACTIVE",
            "IDLE",
            "WAITING",
            "SIZE",
        ])];
        for p in pools {
            rows.push(row(&[
                str_or(&p["user"], "?"),
                str_or(&p["database"], "?"),
                if p["readonly"] == true {
                    "readonly"
                } else {
                    "primary"
                },
                &p["active"].to_string(),
                &p["idle"].to_string(),
                &p["waiting"].to_string(),
                &p["size"].to_string(),
            ]));
        }
        table(&mut out, &rows);
    }

    out.push('\n');
    let Some(sessions) = sessions else {
        let _ = writeln!(out, "sessions: not listed ([health] sessions = false)");
        return out;
    };
    let list = sessions["sessions"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    let _ = writeln!(
        out,
        "sessions: {}{}",
        list.len(),
        if list.len() > top {
            format!(" (the {top} busiest shown)")
        } else {
            String::new()
        }
    );
    let with_text = sessions["show_statements"] == true;
    let mut headers = vec![
        "ID",
        "CLIENT",
        "USER",
        "DATABASE",
        "APPLICATION",
        "HOST",
        "STATE",
        "IN FLIGHT",
        "WAITS",
    ];
    if with_text {
        headers.push("LAST STATEMENT");
    }
    let mut rows = vec![row(&headers)];
    for s in list.iter().take(top) {
        let age = |v: &Value, what: &str| {
            v["seconds"].as_f64().map_or("-".into(), |secs| {
                format!("{} {:.1} s", str_or(&v[what], "?"), secs)
            })
        };
        let mut cells = vec![
            s["id"].to_string(),
            str_or(&s["client"], "?").to_string(),
            str_or(&s["user"], "").to_string(),
            str_or(&s["database"], "").to_string(),
            str_or(&s["application_name"], "").to_string(),
            str_or(&s["host"], "-").to_string(),
            str_or(&s["state"], "?").to_string(),
            age(&s["statement"], "class"),
            age(&s["waiting"], "slot"),
        ];
        if with_text {
            let text: String = str_or(&s["last_statement"], "")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            cells.push(text.chars().take(60).collect());
        }
        rows.push(cells);
    }
    table(&mut out, &rows);
    out
}

fn str_or<'a>(v: &'a Value, or: &'a str) -> &'a str {
    v.as_str().unwrap_or(or)
}

fn row(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|c| c.to_string()).collect()
}

/// Left-aligned columns, two spaces apart.
fn table(out: &mut String, rows: &[Vec<String>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            let _ = write!(line, "{cell:<width$}  ", width = widths[c]);
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_busiest_sessions_are_shown_with_hosts_and_readiness() {
        let health = json!({
            "status": "degraded", "ready": false, "reason": "the write circuit of db1:5432 is open",
            "primary": "db1:5432", "clients": 3, "inflight": 1, "inflight_writes": 1,
            "draining": false, "discovery": {"source": "probe"}, "pool_mode": "passthrough",
            "pools": [],
            "backends": [
                {"address": "db1:5432", "role": "primary", "circuit": "open",
                 "circuit_reason": "3 write timeouts", "answering": true, "last_probe_age_ms": 120},
                {"address": "db2:5432", "role": "standby", "circuit": "closed",
                 "answering": false, "replay_lag_ms": 40, "last_probe_age_ms": 90},
            ],
        });
        let sessions = json!({"count": 3, "show_statements": false, "sessions": [
            {"id": 9, "client": "10.0.0.7:5000", "user": "app", "database": "shop",
             "application_name": "checkout", "host": "db1:5432", "state": "active",
             "statement": {"class": "write", "seconds": 12.5}, "waiting": null},
            {"id": 4, "client": "10.0.0.8:5000", "user": "app", "database": "shop",
             "application_name": "web", "host": "db1:5432", "state": "idle",
             "statement": null, "waiting": null},
            {"id": 5, "client": "10.0.0.9:5000", "user": "app", "database": "shop",
             "application_name": "cron", "host": null, "state": "idle",
             "statement": null, "waiting": null},
        ]});
        let text = render("127.0.0.1:9930", &health, Some(&sessions), 2);
        assert!(
            text.contains("NOT READY: the write circuit of db1:5432 is open"),
            "{text}"
        );
        let db1 = text.lines().find(|l| l.starts_with("db1:5432")).unwrap();
        assert!(
            db1.contains("primary") && db1.contains("open") && db1.contains("3 write timeouts"),
            "{db1}"
        );
        let db2 = text.lines().find(|l| l.starts_with("db2:5432")).unwrap();
        assert!(db2.contains("NO") && db2.contains("40 ms"), "{db2}");
        assert!(text.contains("sessions: 3 (the 2 busiest shown)"), "{text}");
        let first = text.lines().find(|l| l.starts_with("9 ")).unwrap();
        assert!(
            first.contains("checkout") && first.contains("write 12.5 s"),
            "{first}"
        );
        assert!(!text.contains("cron"), "{text}");
        assert!(!text.contains("LAST STATEMENT"));
        let off = render("h:1", &health, None, 10);
        assert!(off.contains("not listed"), "{off}");
    }
}
