//! `lmgen merge` and `lmgen status`.
use crate::args::{MergeArgs, StatusArgs};
use crate::util::hms;
use lmgen_core::job::merge;

pub fn merge(a: MergeArgs) -> anyhow::Result<()> {
    let m = merge::merge(&a.output)?;
    eprintln!(
        "lmgen: merged {} record(s) from {} shard(s) into {}",
        m.records,
        m.shards,
        a.output.display()
    );
    Ok(())
}

pub fn status(a: StatusArgs) -> anyhow::Result<()> {
    let shards = merge::status(&a.output)?;
    let n = shards.first().map_or(1, |s| s.shard.n);
    println!(
        "{:<8} {:>9} {:>9} {:>7} {:>10} {:>9}  state",
        "shard", "done", "total", "%", "tokens/s", "left"
    );
    let (mut done, mut total, mut rate) = (0usize, 0usize, 0f64);
    for s in &shards {
        let p = &s.progress;
        let tps = if p.seconds > 0.0 {
            p.tokens as f64 / p.seconds
        } else {
            0.0
        };
        let rps = if p.seconds > 0.0 {
            p.done as f64 / p.seconds
        } else {
            0.0
        };
        let left = p.total.saturating_sub(p.done);
        let eta = if p.complete || left == 0 {
            "0:00".to_string()
        } else if rps > 0.0 {
            hms(left as f64 / rps)
        } else {
            "--:--".to_string()
        };
        let state = match (&s.running, p.complete, &p.stopped) {
            (Some(h), _, _) => format!("running ({h})"),
            (None, true, _) => "complete".to_string(),
            (None, false, Some(sig)) => format!("stopped by {sig}; resume it"),
            (None, false, None) => "not running".to_string(),
        };
        let pct = if p.total > 0 {
            100.0 * p.done as f64 / p.total as f64
        } else {
            0.0
        };
        println!(
            "{:<8} {:>9} {:>9} {:>6.1}% {:>10.1} {:>9}  {state}",
            s.shard.to_string(),
            p.done,
            p.total,
            pct,
            tps,
            eta
        );
        done += p.done;
        total += p.total;
        if s.running.is_some() {
            rate += rps;
        }
    }
    let missing = n - shards.len().min(n);
    let left = total.saturating_sub(done);
    println!(
        "all      {done:>9} {total:>9}  {} of {n} shard(s) started{}",
        shards.len(),
        if missing > 0 {
            format!("; {missing} not started (their totals are unknown)")
        } else {
            String::new()
        }
    );
    if rate > 0.0 && left > 0 {
        println!("time left at the current rate: {}", hms(left as f64 / rate));
    }
    Ok(())
}
