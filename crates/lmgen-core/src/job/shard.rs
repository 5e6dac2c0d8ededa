//! Splitting a job over processes: `K/N` shards, from the command line or from SLURM's
//! environment, owning contiguous runs of records balanced in tokens.
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Shard `k` of `n` (0-based). `0/1` is the whole job, written in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub k: usize,
    pub n: usize,
}

impl Shard {
    pub const WHOLE: Shard = Shard { k: 0, n: 1 };

    pub fn is_whole(&self) -> bool {
        self.n == 1
    }

    /// `K/N` (0 <= K < N) or `auto` (see [`Shard::from_env`]).
    pub fn parse(s: &str) -> Result<Shard> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("auto") {
            return Shard::from_env(|k| std::env::var(k).ok());
        }
        let bad = || {
            Error::BadRequest(format!(
                "--shard: expected K/N (e.g. 0/4) or auto, got '{s}'"
            ))
        };
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let k: usize = k.trim().parse().map_err(|_| bad())?;
        let n: usize = n.trim().parse().map_err(|_| bad())?;
        if n == 0 || k >= n {
            return Err(Error::BadRequest(format!(
                "--shard {s}: K must be in 0..N-1 and N at least 1"
            )));
        }
        Ok(Shard { k, n })
    }

    /// The shard of this process from SLURM's environment: an array task
    /// (`SLURM_ARRAY_TASK_ID` - `SLURM_ARRAY_TASK_MIN` of `SLURM_ARRAY_TASK_COUNT`), else a
    /// task of `srun` (`SLURM_PROCID` of `SLURM_NTASKS`), else the whole job.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Shard> {
        let num = |k: &str| -> Result<Option<usize>> {
            match var(k) {
                None => Ok(None),
                Some(v) if v.trim().is_empty() => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| {
                    Error::BadRequest(format!("--shard auto: {k}='{v}' is not a number"))
                }),
            }
        };
        if let (Some(id), Some(count)) =
            (num("SLURM_ARRAY_TASK_ID")?, num("SLURM_ARRAY_TASK_COUNT")?)
        {
            let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let step = num("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1).max(1);
            let k = id.checked_sub(min).map(|d| d / step);
            return match k {
                Some(k) if k < count && count > 0 => Ok(Shard { k, n: count }),
                _ => Err(Error::BadRequest(format!(
                    "--shard auto: array task {id} is outside the array (min {min}, step {step}, {count} tasks); give --shard K/N"
                ))),
            };
        }
        if let (Some(rank), Some(ntasks)) = (num("SLURM_PROCID")?, num("SLURM_NTASKS")?) {
            if ntasks > 1 && rank < ntasks {
                return Ok(Shard { k: rank, n: ntasks });
            }
        }
        Ok(Shard::WHOLE)
    }

    /// Which shard of `n` owns each record, from the records' costs (prompt tokens plus the
    /// tokens to generate): contiguous runs of records with about the same total cost, the
    /// same for every shard that computes it.
    pub fn owners(costs: &[u64], n: usize) -> Vec<usize> {
        let total: u128 = costs.iter().map(|&c| c.max(1) as u128).sum();
        let mut before: u128 = 0;
        costs
            .iter()
            .map(|&c| {
                let c = c.max(1) as u128;
                // The shard whose share holds the record's midpoint.
                let mid = 2 * before + c;
                before += c;
                ((mid * n as u128) / (2 * total.max(1))).min(n as u128 - 1) as usize
            })
            .collect()
    }

    /// Where this shard writes, for the job's output `out`: `OUT.shards/K-of-N.EXT` (`EXT`
    /// that of `out`), or `out` itself for the whole job.
    pub fn path(&self, out: &Path) -> PathBuf {
        if self.is_whole() {
            return out.to_path_buf();
        }
        let ext = out
            .extension()
            .map(|e| format!(".{}", e.to_string_lossy()))
            .unwrap_or_default();
        shard_dir(out).join(format!("{}-of-{}{ext}", self.k, self.n))
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.k, self.n)
    }
}

/// The folder beside `out` that holds its shards: `OUT.shards`.
pub fn shard_dir(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".shards");
    PathBuf::from(s)
}

/// The shard files in `dir` (`K-of-N.EXT`, not their sidecars), with their shard.
pub fn list_shards(dir: &Path) -> Result<Vec<(Shard, PathBuf)>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut out = Vec::new();
    for ent in rd.flatten() {
        let name = ent.file_name().to_string_lossy().to_string();
        let is_file = ent.file_type().is_ok_and(|t| t.is_file());
        if !is_file
            || name.contains(".lmgen-")
            || name.contains(".hidden")
            || name.contains(".tmp-")
        {
            continue;
        }
        let stem = name.split('.').next().unwrap_or("");
        let Some((k, n)) = stem.split_once("-of-") else {
            continue;
        };
        if let (Ok(k), Ok(n)) = (k.parse::<usize>(), n.parse::<usize>()) {
            if k < n {
                out.push((Shard { k, n }, ent.path()));
            }
        }
    }
    out.sort_by_key(|(s, _)| (s.n, s.k));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn parse_and_env() {
        assert_eq!(Shard::parse("1/4").unwrap(), Shard { k: 1, n: 4 });
        for bad in ["4/4", "1", "a/b", "0/0", "-1/3"] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
        let s = |p: &[(&str, &str)]| Shard::from_env(env(p)).unwrap();
        assert_eq!(s(&[]), Shard::WHOLE);
        assert_eq!(
            s(&[
                ("SLURM_ARRAY_TASK_ID", "2"),
                ("SLURM_ARRAY_TASK_COUNT", "4")
            ]),
            Shard { k: 2, n: 4 }
        );
        // --array=1-4: ids 1..4, min 1.
        assert_eq!(
            s(&[
                ("SLURM_ARRAY_TASK_ID", "4"),
                ("SLURM_ARRAY_TASK_COUNT", "4"),
                ("SLURM_ARRAY_TASK_MIN", "1"),
                ("SLURM_PROCID", "0"),
                ("SLURM_NTASKS", "1")
            ]),
            Shard { k: 3, n: 4 }
        );
        assert_eq!(
            s(&[("SLURM_PROCID", "1"), ("SLURM_NTASKS", "2")]),
            Shard { k: 1, n: 2 }
        );
        assert_eq!(
            s(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")]),
            Shard::WHOLE
        );
        assert!(Shard::from_env(env(&[
            ("SLURM_ARRAY_TASK_ID", "9"),
            ("SLURM_ARRAY_TASK_COUNT", "4")
        ]))
        .is_err());
    }

    #[test]
    fn owners_are_contiguous_and_balanced() {
        let costs: Vec<u64> = (0..200).map(|i| 10 + (i * 37 % 90) as u64).collect();
        for n in [1, 2, 3, 4, 7] {
            let o = Shard::owners(&costs, n);
            assert!(o.windows(2).all(|w| w[0] <= w[1]), "contiguous");
            assert_eq!((o[0], o[199]), (0, n - 1));
            let total: u64 = costs.iter().sum();
            for k in 0..n {
                let mine: u64 = costs
                    .iter()
                    .zip(&o)
                    .filter(|(_, &s)| s == k)
                    .map(|(c, _)| c)
                    .sum();
                let share = total as f64 / n as f64;
                assert!(
                    (mine as f64 - share).abs() <= 100.0,
                    "shard {k}/{n}: {mine} vs {share}"
                );
            }
        }
        // One huge record among small ones: balanced by cost, not by count.
        let mut c = vec![1u64; 100];
        c[0] = 100;
        let o = Shard::owners(&c, 2);
        assert_eq!(o.iter().filter(|&&s| s == 0).count(), 1);
        assert_eq!(Shard::owners(&[], 3), Vec::<usize>::new());
        assert_eq!(Shard::owners(&[5], 3), vec![1]);
    }

    #[test]
    fn paths() {
        let out = Path::new("/x/out.jsonl");
        assert_eq!(Shard::WHOLE.path(out), out);
        assert_eq!(
            Shard { k: 1, n: 4 }.path(out),
            Path::new("/x/out.jsonl.shards/1-of-4.jsonl")
        );
        assert_eq!(
            Shard { k: 0, n: 2 }.path(Path::new("o")),
            Path::new("o.shards/0-of-2")
        );
    }
}
