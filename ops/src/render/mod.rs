//! Human-readable output of the operator commands: aligned tables, sizes in KB/MB/GB,
//! times such as "3m ago", one-line summaries.
//!
//! Every renderer reads the same JSON report that `--json` prints, so people and scripts
//! see one truth. A field the report lacks shows as "-" instead of failing, so the CLI
//! stays readable against a server one version older or newer than itself.

mod format;
mod table;

use serde_json::Value;

pub use format::{Style, Tone, human_ago, human_bytes, human_count, human_duration, human_span};
use table::{Align, Table, key_values};

fn u64_field(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

fn str_field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn or_dash(x: Option<String>) -> String {
    x.unwrap_or_else(|| "-".into())
}

fn state_tone(state: &str) -> Tone {
    match state {
        "ready" => Tone::Good,
        "queued" | "ingesting" => Tone::Warn,
        "failed" => Tone::Bad,
        _ => Tone::Plain,
    }
}

/// An idle TTL in milliseconds as a duration, `-` when there is none.
fn ttl_cell(doc: &Value) -> String {
    or_dash(u64_field(doc, "ttl_ms").map(|ms| human_duration(ms / 1000)))
}

/// `starkv ls`: one row per document.
pub fn documents_table(list: &Value, now_ms: u64, style: Style) -> String {
    let docs = list
        .get("documents")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    if docs.is_empty() {
        return "no documents\n".into();
    }
    let mut table = Table::new(&[
        ("ID", Align::Left),
        ("STATE", Align::Left),
        ("TOKENS", Align::Right),
        ("BLOCKS", Align::Right),
        ("SIZE", Align::Right),
        ("LAST USED", Align::Left),
        ("PINNED", Align::Left),
        ("TTL", Align::Left),
    ]);
    for doc in docs {
        // Listings hold published documents only; those are ready.
        let state = str_field(doc, "state").unwrap_or("ready");
        table.rows.push(vec![
            (
                or_dash(str_field(doc, "id").map(str::to_string)),
                Tone::Plain,
            ),
            (state.to_string(), state_tone(state)),
            (
                or_dash(u64_field(doc, "tokens").map(human_count)),
                Tone::Plain,
            ),
            (
                or_dash(u64_field(doc, "blocks").map(human_count)),
                Tone::Plain,
            ),
            (
                or_dash(u64_field(doc, "stored_bytes").map(human_bytes)),
                Tone::Plain,
            ),
            (
                or_dash(u64_field(doc, "last_used_ms").map(|t| human_ago(t, now_ms))),
                Tone::Plain,
            ),
            (yes_no(doc.get("pinned")), Tone::Plain),
            (ttl_cell(doc), Tone::Plain),
        ]);
    }
    let mut out = table.render(style);
    if let Some(total) = u64_field(list, "total")
        && total > docs.len() as u64
    {
        out.push_str(&style.paint(
            Tone::Quiet,
            &format!(
                "{} of {} documents shown (--json pages through all)\n",
                docs.len(),
                total
            ),
        ));
    }
    out
}

fn yes_no(v: Option<&Value>) -> String {
    match v.and_then(Value::as_bool) {
        Some(true) => "yes".into(),
        Some(false) => "no".into(),
        None => "-".into(),
    }
}

/// `starkv show DOC`: one document, one aligned line per property.
pub fn document_detail(doc: &Value, now_ms: u64, style: Style) -> String {
    let state = str_field(doc, "state").unwrap_or("-");
    let mut pairs = vec![
        ("id", or_dash(str_field(doc, "id").map(str::to_string))),
        ("state", style.paint(state_tone(state), state)),
    ];
    match state {
        "ingesting" => pairs.push((
            "blocks",
            format!(
                "{} of {} encoded",
                or_dash(u64_field(doc, "blocks_done").map(human_count)),
                or_dash(u64_field(doc, "blocks_total").map(human_count))
            ),
        )),
        "failed" => pairs.push((
            "reason",
            style.paint(Tone::Bad, str_field(doc, "reason").unwrap_or("-")),
        )),
        _ => {}
    }
    if let Some(submitted) = u64_field(doc, "submitted_ms") {
        pairs.push(("submitted", human_ago(submitted, now_ms)));
    }
    if state == "ready" {
        pairs.extend(ready_details(doc, now_ms));
    }
    key_values(&pairs, style)
}

fn ready_details(doc: &Value, now_ms: u64) -> Vec<(&'static str, String)> {
    let mut pairs = vec![(
        "version",
        or_dash(u64_field(doc, "version").map(|v| v.to_string())),
    )];
    if let Some(tokens) = u64_field(doc, "tokens") {
        pairs.push(("tokens", human_count(tokens)));
    }
    let mut blocks = or_dash(u64_field(doc, "blocks").map(human_count));
    if let Some(reused) = u64_field(doc, "reused_blocks").filter(|&r| r > 0) {
        blocks.push_str(&format!(" ({reused} reused by the last ingest)"));
    }
    pairs.push(("blocks", blocks));
    if let Some(kv) = doc.get("kv_dtype").and_then(Value::as_str) {
        let stored = doc.get("stored_dtype").and_then(Value::as_str);
        pairs.push((
            "kv dtype",
            match stored {
                Some(s) if s != kv => format!("{kv} (stored as {s})"),
                _ => kv.to_string(),
            },
        ));
    }
    let stored = u64_field(doc, "stored_bytes");
    let size = match (stored, u64_field(doc, "raw_bytes")) {
        (Some(s), Some(r)) if r > 0 => format!(
            "{} stored, {} decoded ({:.2}x)",
            human_bytes(s),
            human_bytes(r),
            s as f64 / r as f64
        ),
        (s, _) => or_dash(s.map(human_bytes)),
    };
    pairs.push(("size", size));
    if let Some(created) = u64_field(doc, "created_ms") {
        pairs.push(("created", human_ago(created, now_ms)));
    }
    let last_used = u64_field(doc, "last_used_ms");
    pairs.push((
        "last used",
        or_dash(last_used.map(|t| human_ago(t, now_ms))),
    ));
    pairs.push(("pinned", yes_no(doc.get("pinned"))));
    let ttl = match (u64_field(doc, "ttl_ms"), last_used) {
        (Some(ttl), Some(used)) if doc.get("pinned") != Some(&Value::Bool(true)) => {
            let left = (used + ttl).saturating_sub(now_ms) / 1000;
            format!(
                "{} idle (expires in {})",
                human_duration(ttl / 1000),
                human_duration(left)
            )
        }
        (Some(ttl), _) => format!("{} idle", human_duration(ttl / 1000)),
        (None, _) => "none".into(),
    };
    pairs.push(("ttl", ttl));
    if let Some(n) = u64_field(doc, "active_queries") {
        pairs.push(("queries", format!("{n} active")));
    }
    if let Some(secs) = doc.get("ingest_seconds").and_then(Value::as_f64) {
        pairs.push(("ingest", format!("{secs:.1} s")));
    }
    pairs
}

/// Hits as a percentage of lookups, with the counts: `92.3% (1,200 of 1,300)`.
fn hit_rate(hits: u64, misses: u64) -> String {
    let total = hits + misses;
    if total == 0 {
        return "no lookups yet".into();
    }
    format!(
        "hit rate {:.1}% ({} of {})",
        100.0 * hits as f64 / total as f64,
        human_count(hits),
        human_count(total)
    )
}

/// `used of budget`, or `used` when the budget is unknown or zero.
fn used_of(used: u64, budget: Option<u64>) -> String {
    match budget {
        Some(b) if b > 0 => format!(
            "{} of {} ({:.0}%)",
            human_bytes(used),
            human_bytes(b),
            100.0 * used as f64 / b as f64
        ),
        _ => human_bytes(used),
    }
}

/// `starkv stats`: device, store size and budget, tiers, evictions, integrity.
pub fn stats_report(stats: &Value, style: Style) -> String {
    let mut pairs = Vec::new();
    let device = match (
        str_field(stats, "device"),
        str_field(stats, "device_detail"),
    ) {
        // The detail usually starts with the id ("cuda:0 NVIDIA H200 ...").
        (Some(id), Some(detail)) if detail.starts_with(id) => detail.to_string(),
        (Some(id), Some(detail)) => format!("{id} ({detail})"),
        (Some(id), _) => id.to_string(),
        (None, _) => "none (the data directory, read directly)".into(),
    };
    pairs.push(("device", device));
    pairs.push((
        "documents",
        format!(
            "{} ({} blocks)",
            or_dash(u64_field(stats, "documents").map(human_count)),
            or_dash(u64_field(stats, "blocks").map(human_count))
        ),
    ));
    if let Some(bytes) = u64_field(stats, "store_bytes") {
        let budget = u64_field(stats, "store_budget_bytes");
        let mut store = used_of(bytes, budget);
        if budget.is_none() && stats.get("store_budget_bytes").is_some() {
            store.push_str(" (no budget)");
        }
        pairs.push(("store", store));
    }
    if let Some(disk) = u64_field(stats, "disk_bytes") {
        pairs.push(("on disk", human_bytes(disk)));
    }
    if let Some(gpu) = stats.get("gpu_tier").filter(|g| g.is_object()) {
        let mut line = format!(
            "{} blocks, {}, {}",
            or_dash(u64_field(gpu, "blocks").map(human_count)),
            used_of(
                u64_field(gpu, "used_bytes").unwrap_or(0),
                u64_field(gpu, "budget_bytes")
            ),
            hit_rate(
                u64_field(gpu, "hits").unwrap_or(0),
                u64_field(gpu, "misses").unwrap_or(0)
            )
        );
        if let Some(e) = u64_field(gpu, "evictions") {
            line.push_str(&format!(", {} evicted", human_count(e)));
        }
        pairs.push(("GPU tier", line));
    }
    if let Some(hot) = stats.get("hot_tier").filter(|h| h.is_object()) {
        pairs.push((
            "memory tier",
            format!(
                "{} layers, {}, {}",
                or_dash(u64_field(hot, "entries").map(human_count)),
                used_of(
                    u64_field(hot, "bytes").unwrap_or(0),
                    u64_field(hot, "budget")
                ),
                hit_rate(
                    u64_field(hot, "hits").unwrap_or(0),
                    u64_field(hot, "misses").unwrap_or(0)
                )
            ),
        ));
    }
    if let (Some(blocks), Some(bytes)) = (
        u64_field(stats, "blocks_written"),
        u64_field(stats, "bytes_written"),
    ) {
        let dedup = u64_field(stats, "blocks_deduplicated").unwrap_or(0);
        pairs.push((
            "written",
            format!(
                "{} blocks, {} ({} deduplicated)",
                human_count(blocks),
                human_bytes(bytes),
                human_count(dedup)
            ),
        ));
    }
    if let Some(read) = u64_field(stats, "bytes_read") {
        pairs.push(("read", human_bytes(read)));
    }
    if let Some(evictions) = stats.get("evictions").and_then(Value::as_object) {
        let mut parts: Vec<String> = evictions
            .iter()
            .filter_map(|(reason, n)| {
                let n = n.as_u64()?;
                (n > 0).then(|| format!("{reason} {}", human_count(n)))
            })
            .collect();
        parts.sort();
        let line = if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        };
        pairs.push(("evictions", line));
    }
    let failures = u64_field(stats, "checksum_failures");
    let pending = u64_field(stats, "repair_pending").unwrap_or(0);
    let integrity = match failures {
        Some(0) | None if pending == 0 => style.paint(Tone::Good, "no checksum failures"),
        _ => style.paint(
            Tone::Bad,
            &format!(
                "{} checksum failures, {} awaiting repair",
                or_dash(failures.map(human_count)),
                count_of(pending, "block", "blocks")
            ),
        ),
    };
    pairs.push(("integrity", integrity));
    // Store-level damage (issue 12): versions whose manifest is unreadable everywhere,
    // manifests restored from their copies, and what the engine did to open.
    if let Some(lost) = u64_field(stats, "lost_documents").filter(|&n| n > 0) {
        pairs.push((
            "lost",
            style.paint(
                Tone::Bad,
                &format!(
                    "{} (unreadable manifests; delete or re-ingest)",
                    count_of(lost, "document", "documents")
                ),
            ),
        ));
    }
    if let Some(restored) = u64_field(stats, "restored_manifests").filter(|&n| n > 0) {
        pairs.push((
            "restored",
            format!(
                "{} from their copies",
                count_of(restored, "manifest", "manifests")
            ),
        ));
    }
    for recovery in stats
        .get("recoveries")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        pairs.push(("recovered", recovery.as_str().unwrap_or("-").to_string()));
    }
    if let Some(depth) = u64_field(stats, "ingest_queue_depth") {
        pairs.push(("ingest queue", format!("{depth} waiting")));
    }
    key_values(&pairs, style)
}

/// `starkv evict`: what went, why, and what it freed.
pub fn evict_summary(report: &Value, style: Style) -> String {
    let evicted = report
        .get("evicted")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    if evicted.is_empty() {
        return "nothing evicted\n".into();
    }
    // Each entry is `[tenant/id@version, rule]`.
    let mut by_rule: Vec<(String, usize)> = Vec::new();
    for e in evicted {
        let rule = e.get(1).and_then(Value::as_str).unwrap_or("-").to_string();
        match by_rule.iter_mut().find(|(r, _)| *r == rule) {
            Some((_, n)) => *n += 1,
            None => by_rule.push((rule, 1)),
        }
    }
    let rules: Vec<String> = by_rule.iter().map(|(r, n)| format!("{r}: {n}")).collect();
    let mut out = format!(
        "evicted {} {} ({}); {} blocks deleted, {} freed\n",
        evicted.len(),
        plural(evicted.len(), "document", "documents"),
        rules.join(", "),
        or_dash(u64_field(report, "blocks_deleted").map(human_count)),
        or_dash(u64_field(report, "bytes_freed").map(human_bytes))
    );
    for e in evicted {
        let doc = e.get(0).and_then(Value::as_str).unwrap_or("-");
        let rule = e.get(1).and_then(Value::as_str).unwrap_or("-");
        out.push_str(&format!("  {doc} {}\n", style.paint(Tone::Quiet, rule)));
    }
    out
}

fn plural<'a>(n: usize, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 { one } else { many }
}

/// `1 block`, `2 blocks`.
fn count_of(n: u64, one: &str, many: &str) -> String {
    format!("{} {}", human_count(n), plural(n as usize, one, many))
}

/// `starkv gc`: blocks no document references any more.
pub fn gc_summary(report: &Value) -> String {
    let scanned = or_dash(u64_field(report, "scanned").map(human_count));
    match u64_field(report, "deleted") {
        Some(0) => format!("gc: nothing to delete ({scanned} blocks scanned)\n"),
        deleted => format!(
            "gc: {} unreferenced blocks deleted of {scanned} scanned, {} freed\n",
            or_dash(deleted.map(human_count)),
            or_dash(u64_field(report, "bytes_freed").map(human_bytes))
        ),
    }
}

/// `starkv verify`: how many documents were read back, which are corrupt, what was
/// repaired; then one line per shard worker (a cluster's, or a stopped server's
/// in-process workers' stores), with its corrupt parts.
pub fn verify_summary(report: &Value, style: Style) -> String {
    let mut out = store_verify_summary(report, style);
    for w in report
        .get("workers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let address = str_field(w, "address").unwrap_or("-");
        if let Some(error) = str_field(w, "error") {
            let line = format!("not verified: {error}");
            out.push_str(&format!(
                "worker {address}: {}\n",
                style.paint(Tone::Bad, &line)
            ));
            continue;
        }
        let documents = u64_field(w, "documents").unwrap_or(0);
        let corrupt = w
            .get("corrupt")
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice);
        let repaired = u64_field(w, "repaired_blocks").unwrap_or(0);
        let parts = format!(
            "{} {}",
            human_count(documents),
            plural(documents as usize, "part", "parts")
        );
        let verdict = if corrupt.is_empty() && !w["corruption_found"].as_bool().unwrap_or(false) {
            style.paint(Tone::Good, "intact")
        } else {
            style.paint(Tone::Bad, &format!("{} corrupt", corrupt.len()))
        };
        out.push_str(&format!("worker {address}: {parts}, {verdict}"));
        if repaired > 0 {
            let fixed = format!("{repaired} blocks repaired");
            out.push_str(&format!(", {}", style.paint(Tone::Good, &fixed)));
        }
        out.push('\n');
        for c in corrupt {
            out.push_str(&format!("  {}\n", c.as_str().unwrap_or("-")));
        }
    }
    out
}

/// The store part of [`verify_summary`].
fn store_verify_summary(report: &Value, style: Style) -> String {
    let documents = u64_field(report, "documents").unwrap_or(0);
    let corrupt = report
        .get("corrupt")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    let repaired = u64_field(report, "repaired_blocks").unwrap_or(0);
    let head = format!(
        "verified {} {}",
        human_count(documents),
        plural(documents as usize, "document", "documents")
    );
    // Store-level findings (issue 12): lost manifests, damaged document rows, and what the
    // store did to open (a repaired or quarantined instance), one line each.
    let mut findings = String::new();
    for (field, label) in [
        ("lost_documents", "lost (not served; delete or re-ingest)"),
        ("meta_problems", "document rows"),
        ("recoveries", "store recovered"),
    ] {
        for item in report
            .get(field)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            findings.push_str(&format!("  {label}: {}\n", item.as_str().unwrap_or("-")));
        }
    }
    if !findings.is_empty() && corrupt.is_empty() && repaired == 0 {
        return format!(
            "{head}: {}\n{findings}",
            style.paint(Tone::Bad, "store damage found")
        );
    }
    if corrupt.is_empty() && repaired == 0 {
        return format!(
            "{head}: {}\n",
            style.paint(Tone::Good, "every block intact")
        );
    }
    let mut out = format!(
        "{head}: {}",
        style.paint(Tone::Bad, &format!("{} corrupt", corrupt.len()))
    );
    if repaired > 0 {
        out.push_str(&format!(
            ", {}",
            style.paint(Tone::Good, &format!("{repaired} blocks repaired"))
        ));
    }
    out.push('\n');
    for c in corrupt {
        out.push_str(&format!("  {}\n", c.as_str().unwrap_or("-")));
    }
    out.push_str(&findings);
    out
}

/// `starkv ingest`: the finished document in one line.
pub fn ingest_summary(doc: &Value) -> String {
    let id = str_field(doc, "id").unwrap_or("-");
    let mut parts = Vec::new();
    if let Some(t) = u64_field(doc, "tokens") {
        parts.push(format!("{} tokens", human_count(t)));
    }
    if let Some(b) = u64_field(doc, "blocks") {
        let mut blocks = format!(
            "{} {}",
            human_count(b),
            plural(b as usize, "block", "blocks")
        );
        if let Some(r) = u64_field(doc, "reused_blocks").filter(|&r| r > 0) {
            blocks.push_str(&format!(" ({r} reused)"));
        }
        parts.push(blocks);
    }
    if let Some(s) = u64_field(doc, "stored_bytes") {
        parts.push(human_bytes(s));
    }
    if let Some(secs) = doc.get("ingest_seconds").and_then(Value::as_f64) {
        parts.push(format!("{secs:.1} s"));
    }
    format!("{id} ready: {}\n", parts.join(", "))
}

/// `rm`, `pin`, `unpin`, `ttl`: what changed.
pub fn change_summary(report: &Value) -> String {
    let id = str_field(report, "id").unwrap_or("-");
    if report.get("deleted").and_then(Value::as_bool) == Some(true) {
        return match (
            u64_field(report, "blocks_deleted"),
            u64_field(report, "bytes_freed"),
        ) {
            (Some(b), Some(f)) => format!(
                "deleted {id} ({} blocks, {} freed)\n",
                human_count(b),
                human_bytes(f)
            ),
            _ => format!("deleted {id}\n"),
        };
    }
    if let Some(pinned) = report.get("pinned").and_then(Value::as_bool) {
        return format!("{id} {}\n", if pinned { "pinned" } else { "unpinned" });
    }
    if let Some(ttl) = report.get("ttl_seconds") {
        return match ttl.as_u64() {
            Some(s) => format!("{id}: idle TTL {}\n", human_duration(s)),
            None => format!("{id}: TTL cleared\n"),
        };
    }
    format!("{report}\n")
}

/// `starkv cluster`: one row per shard worker (health, what it holds, traffic).
/// A worker's mean attend round trip and the share of it spent computing on the
/// worker, e.g. `1.50 ms (85% computing)`; `-` before any call.
fn attend_cell(worker: &Value) -> String {
    let attend = worker.get("attend").unwrap_or(&Value::Null);
    let mean = |k: &str| attend.get(k).and_then(Value::as_f64);
    match (u64_field(attend, "calls"), mean("mean_round_trip_us")) {
        (Some(calls), Some(rt)) if calls > 0 && rt > 0.0 => {
            let compute = mean("mean_worker_compute_us").unwrap_or(0.0);
            format!(
                "{:.2} ms ({:.0}% computing)",
                rt / 1e3,
                100.0 * compute / rt
            )
        }
        _ => "-".into(),
    }
}

pub fn cluster_table(cluster: &Value, now_ms: u64, style: Style) -> String {
    let workers = cluster
        .get("workers")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    let mode = str_field(cluster, "mode").unwrap_or("-");
    if workers.is_empty() {
        let device = str_field(cluster, "device").map_or(String::new(), |d| format!(" on {d}"));
        return format!("{mode} server{device}: no shard workers\n");
    }
    let mut table = Table::new(&[
        ("WORKER", Align::Left),
        ("HEALTH", Align::Left),
        ("DEVICE", Align::Left),
        ("DOCS", Align::Right),
        ("BLOCKS", Align::Right),
        ("SIZE", Align::Right),
        ("CALLS", Align::Right),
        ("FAILED", Align::Right),
        ("ATTEND", Align::Right),
        ("SEEN", Align::Left),
    ]);
    for w in workers {
        let healthy = w.get("healthy").and_then(Value::as_bool);
        let (health, tone) = match healthy {
            Some(true) => ("up", Tone::Good),
            Some(false) => ("down", Tone::Bad),
            None => ("-", Tone::Plain),
        };
        let count = |k: &str| or_dash(u64_field(w, k).map(human_count));
        table.rows.push(vec![
            (
                or_dash(str_field(w, "address").map(str::to_string)),
                Tone::Plain,
            ),
            (health.to_string(), tone),
            (
                or_dash(str_field(w, "device").map(str::to_string)),
                Tone::Plain,
            ),
            (count("documents"), Tone::Plain),
            (count("blocks"), Tone::Plain),
            (
                or_dash(u64_field(w, "stored_bytes").map(human_bytes)),
                Tone::Plain,
            ),
            (count("calls"), Tone::Plain),
            (count("failures"), Tone::Plain),
            (attend_cell(w), Tone::Plain),
            (
                or_dash(u64_field(w, "last_seen_ms").map(|t| human_ago(t, now_ms))),
                Tone::Plain,
            ),
        ]);
    }
    let mut out = String::new();
    if let Some(r) = u64_field(cluster, "replicas") {
        out.push_str(&format!("{mode}, {r} replica(s) per block\n"));
    }
    out.push_str(&table.render(style));
    for w in workers {
        if let Some(err) = str_field(w, "last_error") {
            out.push_str(&format!(
                "{}: {}\n",
                str_field(w, "address").unwrap_or("-"),
                style.paint(Tone::Bad, err)
            ));
        }
    }
    out
}

/// What follows a streamed answer: one quiet line of size and timings and, when the
/// question asked for log-probabilities, each token with its probability and the
/// runners-up (how sure the model was, token by token).
pub fn answer_footer(answer: &Value, style: Style) -> String {
    let usage = answer.get("usage").unwrap_or(&Value::Null);
    let timings = answer.get("timings").unwrap_or(&Value::Null);
    let ms = |k: &str| timings.get(k).and_then(Value::as_f64);
    let mut facts = Vec::new();
    if let Some(n) = u64_field(usage, "generated_tokens") {
        facts.push(format!("{} tokens", human_count(n)));
        if let (Some(first), Some(total)) = (ms("first_token_ms"), ms("total_ms")) {
            facts.push(format!("first token {first:.0} ms"));
            if n > 1 {
                facts.push(format!("{:.1} ms/token", (total - first) / (n - 1) as f64));
            }
        }
    }
    if let Some(n) = u64_field(usage, "cached_context_tokens") {
        facts.push(format!("{} context tokens", human_count(n)));
    }
    match u64_field(answer, "repaired_blocks") {
        Some(n) if n > 0 => facts.push(format!("{n} block(s) repaired")),
        _ => {}
    }
    let mut out = String::new();
    if !facts.is_empty() {
        out.push_str(&style.paint(Tone::Quiet, &facts.join(" · ")));
        out.push('\n');
    }
    let Some(tokens) = answer.get("logprobs").and_then(Value::as_array) else {
        return out;
    };
    let percent = |e: &Value| {
        e.get("logprob")
            .and_then(Value::as_f64)
            .map_or("-".into(), |lp| format!("{:.1}%", 100.0 * lp.exp()))
    };
    let token = |e: &Value| format!("{:?}", str_field(e, "token").unwrap_or(""));
    let mut table = Table::new(&[
        ("#", Align::Right),
        ("TOKEN", Align::Left),
        ("P", Align::Right),
        ("ALTERNATIVES", Align::Left),
    ]);
    for (i, t) in tokens.iter().enumerate() {
        let p = t
            .get("logprob")
            .and_then(Value::as_f64)
            .map_or(0.0, f64::exp);
        let tone = match p {
            p if p < 0.5 => Tone::Bad,
            p if p < 0.9 => Tone::Warn,
            _ => Tone::Plain,
        };
        let others: Vec<String> = t
            .get("top")
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice)
            .iter()
            .filter(|e| e.get("id") != t.get("id"))
            .map(|e| format!("{} {}", token(e), percent(e)))
            .collect();
        table.rows.push(vec![
            ((i + 1).to_string(), Tone::Quiet),
            (token(t), Tone::Plain),
            (percent(t), tone),
            (others.join(", "), Tone::Quiet),
        ]);
    }
    out.push_str(&table.render(style));
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn listing() -> Value {
        json!({
            "total": 3,
            "documents": [
                { "id": "report", "version": 2, "blocks": 4, "stored_bytes": 153_000_000u64,
                  "pinned": true, "last_used_ms": NOW - 180_000, "tokens": 7996 },
                { "id": "a", "version": 1, "blocks": 12, "stored_bytes": 900,
                  "pinned": false, "last_used_ms": NOW - 7_200_000, "ttl_ms": 3_600_000 },
            ]
        })
    }

    #[test]
    fn documents_table_is_aligned() {
        let out = documents_table(&listing(), NOW, Style::PLAIN);
        let expected = "\
ID      STATE  TOKENS  BLOCKS    SIZE  LAST USED  PINNED  TTL
report  ready   7,996       4  153 MB  3m ago     yes     -
a       ready       -      12   900 B  2h ago     no      1h
2 of 3 documents shown (--json pages through all)
";
        assert_eq!(out, expected);
        assert_eq!(
            documents_table(&json!({ "documents": [] }), NOW, Style::PLAIN),
            "no documents\n"
        );
    }

    #[test]
    fn coloured_cells_keep_the_alignment() {
        let plain = documents_table(&listing(), NOW, Style::PLAIN);
        let coloured = documents_table(&listing(), NOW, Style::new(true, None));
        assert_ne!(plain, coloured);
        let stripped = coloured
            .replace("\x1b[0m", "")
            .replace("\x1b[1m", "")
            .replace("\x1b[2m", "")
            .replace("\x1b[32m", "");
        assert_eq!(stripped, plain);
    }

    #[test]
    fn document_detail_of_ready_ingesting_and_failed_documents() {
        let ready = json!({
            "id": "report", "state": "ready", "version": 2, "blocks": 4, "stored_bytes": 150_000_000u64,
            "raw_bytes": 180_000_000u64, "created_ms": NOW - 600_000, "last_used_ms": NOW - 180_000,
            "pinned": false, "ttl_ms": 3_600_000, "active_queries": 0, "tokens": 7996,
            "reused_blocks": 1, "ingest_seconds": 60.54, "kv_dtype": "f16", "stored_dtype": "bf16"
        });
        let expected = "\
id         report
state      ready
version    2
tokens     7,996
blocks     4 (1 reused by the last ingest)
kv dtype   f16 (stored as bf16)
size       150 MB stored, 180 MB decoded (0.83x)
created    10m ago
last used  3m ago
pinned     no
ttl        1h idle (expires in 57m)
queries    0 active
ingest     60.5 s
";
        assert_eq!(document_detail(&ready, NOW, Style::PLAIN), expected);
        let int8 =
            json!({ "id": "q", "state": "ready", "kv_dtype": "int8", "stored_dtype": "int8" });
        assert!(
            document_detail(&int8, NOW, Style::PLAIN).contains("kv dtype   int8\n"),
            "{}",
            document_detail(&int8, NOW, Style::PLAIN)
        );
        let fp8 = json!({ "id": "q", "state": "ready", "kv_dtype": "fp8", "stored_dtype": "fp8" });
        assert!(document_detail(&fp8, NOW, Style::PLAIN).contains("kv dtype   fp8\n"));
        let ingesting = json!({ "id": "b", "state": "ingesting", "blocks_done": 2,
                                "blocks_total": 5, "submitted_ms": NOW - 30_000 });
        assert_eq!(
            document_detail(&ingesting, NOW, Style::PLAIN),
            "id         b\nstate      ingesting\nblocks     2 of 5 encoded\nsubmitted  30s ago\n"
        );
        let failed = json!({ "id": "c", "state": "failed", "reason": "too long" });
        assert_eq!(
            document_detail(&failed, NOW, Style::PLAIN),
            "id      c\nstate   failed\nreason  too long\n"
        );
    }

    #[test]
    fn stats_report_from_a_server() {
        let stats = json!({
            "device": "cuda:0", "device_detail": "cuda:0 NVIDIA H200",
            "gpu_tier": { "blocks": 40, "used_bytes": 3_200_000_000u64, "budget_bytes": 64_000_000_000u64,
                          "hits": 1200, "misses": 100, "evictions": 3 },
            "documents": 12, "blocks": 48, "store_bytes": 1_530_000_000u64,
            "store_budget_bytes": 10_000_000_000u64,
            "hot_tier": { "entries": 120, "bytes": 500_000_000u64, "budget": 1_000_000_000u64,
                          "hits": 30, "misses": 10 },
            "bytes_written": 1_600_000_000u64, "blocks_written": 50, "blocks_deduplicated": 2,
            "bytes_read": 4_500_000_000u64, "checksum_failures": 0,
            "evictions": { "ttl": 2, "lru": 5, "quota": 0, "deleted": 1, "replaced": 0 },
            "gc_blocks": 0, "repair_pending": 0, "ingest_queue_depth": 1
        });
        let expected = "\
device        cuda:0 NVIDIA H200
documents     12 (48 blocks)
store         1.53 GB of 10.0 GB (15%)
GPU tier      40 blocks, 3.20 GB of 64.0 GB (5%), hit rate 92.3% (1,200 of 1,300), 3 evicted
memory tier   120 layers, 500 MB of 1.00 GB (50%), hit rate 75.0% (30 of 40)
written       50 blocks, 1.60 GB (2 deduplicated)
read          4.50 GB
evictions     deleted 1, lru 5, ttl 2
integrity     no checksum failures
ingest queue  1 waiting
";
        assert_eq!(stats_report(&stats, Style::PLAIN), expected);
    }

    #[test]
    fn stats_report_of_a_data_directory_flags_damage() {
        let stats = json!({ "documents": 1, "blocks": 4, "store_bytes": 1000, "disk_bytes": 2000,
                            "checksum_failures": 2, "repair_pending": 1, "lost_documents": 1,
                            "restored_manifests": 2, "recoveries": ["shard-001 repaired"] });
        let expected = "\
device     none (the data directory, read directly)
documents  1 (4 blocks)
store      1.00 KB
on disk    2.00 KB
integrity  2 checksum failures, 1 block awaiting repair
lost       1 document (unreadable manifests; delete or re-ingest)
restored   2 manifests from their copies
recovered  shard-001 repaired
";
        assert_eq!(stats_report(&stats, Style::PLAIN), expected);
    }

    #[test]
    fn one_line_summaries() {
        let evict = json!({ "evicted": [["default/a@1", "lru"], ["default/b@3", "older_than"],
                                        ["t/c@1", "lru"]],
                            "blocks_deleted": 9, "bytes_freed": 306_000_000u64 });
        assert_eq!(
            evict_summary(&evict, Style::PLAIN),
            "evicted 3 documents (lru: 2, older_than: 1); 9 blocks deleted, 306 MB freed\n  default/a@1 lru\n  default/b@3 older_than\n  t/c@1 lru\n"
        );
        assert_eq!(
            evict_summary(
                &json!({ "evicted": [], "blocks_deleted": 0, "bytes_freed": 0 }),
                Style::PLAIN
            ),
            "nothing evicted\n"
        );
        assert_eq!(
            gc_summary(&json!({ "scanned": 50, "deleted": 3, "bytes_freed": 12_300_000 })),
            "gc: 3 unreferenced blocks deleted of 50 scanned, 12.3 MB freed\n"
        );
        assert_eq!(
            gc_summary(&json!({ "scanned": 50, "deleted": 0, "bytes_freed": 0 })),
            "gc: nothing to delete (50 blocks scanned)\n"
        );
        assert_eq!(
            verify_summary(
                &json!({ "documents": 5, "corrupt": [], "repaired_blocks": 0 }),
                Style::PLAIN
            ),
            "verified 5 documents: every block intact\n"
        );
        assert_eq!(
            verify_summary(
                &json!({ "documents": 1, "corrupt": ["default/a@1: checksum"], "repaired_blocks": 2 }),
                Style::PLAIN
            ),
            "verified 1 document: 1 corrupt, 2 blocks repaired\n  default/a@1: checksum\n"
        );
        assert_eq!(
            verify_summary(
                &json!({ "documents": 1, "corrupt": [], "repaired_blocks": 0,
                         "recoveries": ["shard 1: quarantined to q and reopened empty (cause: c)"] }),
                Style::PLAIN
            ),
            "verified 1 document: store damage found\n  store recovered: shard 1: quarantined to q and reopened empty (cause: c)\n"
        );
        assert_eq!(
            verify_summary(
                &json!({ "documents": 0, "corrupt": [], "repaired_blocks": 0, "workers": [
                    { "address": "local:0", "documents": 2, "corrupt": [], "repaired_blocks": 0,
                      "corruption_found": false },
                    { "address": "local:1", "documents": 1, "corrupt": ["t/a@1: checksum"],
                      "repaired_blocks": 3, "corruption_found": true },
                    { "address": "10.0.0.5:8701", "documents": 0, "corrupt": [], "repaired_blocks": 0,
                      "corruption_found": false, "error": "timed out" } ] }),
                Style::PLAIN
            ),
            "verified 0 documents: every block intact\nworker local:0: 2 parts, intact\n\
             worker local:1: 1 part, 1 corrupt, 3 blocks repaired\n  t/a@1: checksum\n\
             worker 10.0.0.5:8701: not verified: timed out\n"
        );
        assert_eq!(
            ingest_summary(
                &json!({ "id": "a", "state": "ready", "tokens": 7996, "blocks": 4,
                                    "reused_blocks": 2, "stored_bytes": 153_000_000u64,
                                    "ingest_seconds": 60.54 })
            ),
            "a ready: 7,996 tokens, 4 blocks (2 reused), 153 MB, 60.5 s\n"
        );
        assert_eq!(
            change_summary(&json!({ "id": "a", "deleted": true })),
            "deleted a\n"
        );
        assert_eq!(
            change_summary(
                &json!({ "id": "a", "deleted": true, "blocks_deleted": 4, "bytes_freed": 1500 })
            ),
            "deleted a (4 blocks, 1.50 KB freed)\n"
        );
        assert_eq!(
            change_summary(&json!({ "id": "a", "pinned": true })),
            "a pinned\n"
        );
        assert_eq!(
            change_summary(&json!({ "id": "a", "ttl_seconds": 5400 })),
            "a: idle TTL 1h 30m\n"
        );
        assert_eq!(
            change_summary(&json!({ "id": "a", "ttl_seconds": null })),
            "a: TTL cleared\n"
        );
    }

    #[test]
    fn answer_footer_with_and_without_logprobs() {
        let plain = json!({
            "answer": "It is 42.", "usage": { "generated_tokens": 5, "cached_context_tokens": 8000 },
            "timings": { "first_token_ms": 120.0, "total_ms": 132.4 }, "repaired_blocks": 0
        });
        assert_eq!(
            answer_footer(&plain, Style::PLAIN),
            "5 tokens · first token 120 ms · 3.1 ms/token · 8,000 context tokens\n"
        );
        let mut sure = plain.clone();
        sure["logprobs"] = json!([
            { "token": "It", "id": 7, "logprob": -0.01,
              "top": [{ "token": "It", "id": 7, "logprob": -0.01 }, { "token": "The", "id": 9, "logprob": -4.8 }] },
            { "token": " is", "id": 3, "logprob": -0.693,
              "top": [{ "token": " is", "id": 3, "logprob": -0.693 }, { "token": " was", "id": 4, "logprob": -0.7 }] }
        ]);
        let expected = "\
5 tokens · first token 120 ms · 3.1 ms/token · 8,000 context tokens
#  TOKEN      P  ALTERNATIVES
1  \"It\"   99.0%  \"The\" 0.8%
2  \" is\"  50.0%  \" was\" 49.7%
";
        assert_eq!(answer_footer(&sure, Style::PLAIN), expected);
        // Unsure tokens stand out when coloured.
        assert!(answer_footer(&sure, Style::new(true, None)).contains("\x1b["));
        assert_eq!(answer_footer(&json!({}), Style::PLAIN), "");
    }

    #[test]
    fn cluster_table_of_a_coordinator_and_of_a_single_server() {
        let cluster = json!({
            "mode": "coordinator", "replicas": 2,
            "workers": [
                { "address": "10.0.0.1:8701", "healthy": true, "device": "cuda:0", "documents": 3,
                  "blocks": 24, "stored_bytes": 1_200_000_000u64, "calls": 1500, "failures": 0,
                  "last_error": null, "last_seen_ms": NOW - 2_000,
                  "attend": { "calls": 1200, "mean_round_trip_us": 1500.0,
                              "mean_worker_queued_us": 40.0, "mean_worker_compute_us": 1275.0 } },
                { "address": "10.0.0.2:8701", "healthy": false, "device": "cuda:0", "documents": 3,
                  "blocks": 20, "stored_bytes": 1_000_000_000u64, "calls": 1400, "failures": 7,
                  "last_error": "connection refused", "last_seen_ms": NOW - 120_000 }
            ]
        });
        let expected = "\
coordinator, 2 replica(s) per block
WORKER         HEALTH  DEVICE  DOCS  BLOCKS     SIZE  CALLS  FAILED                   ATTEND  SEEN
10.0.0.1:8701  up      cuda:0     3      24  1.20 GB  1,500       0  1.50 ms (85% computing)  just now
10.0.0.2:8701  down    cuda:0     3      20  1.00 GB  1,400       7                        -  2m ago
10.0.0.2:8701: connection refused
";
        assert_eq!(cluster_table(&cluster, NOW, Style::PLAIN), expected);
        let single = json!({ "mode": "single", "device": "cpu", "workers": [] });
        assert_eq!(
            cluster_table(&single, NOW, Style::PLAIN),
            "single server on cpu: no shard workers\n"
        );
    }
}
